"""Export the BASE classifier (seq-cls or token-cls, no adapters) as an ONNX inference model: the export template.

`input_ids` and `attention_mask` [batch, sequence] in, `logits` out ([batch, labels] for seq-cls,
[batch, sequence, labels] for token-cls). As for the causal LM's template (ortft/prepare/inference.py),
weights stay initializers named as Hugging Face parameters, so `ortft export --format merged-onnx`
folds the adapters into them and puts the trained classifier head (weight and bias) in place; the
model's configuration, with its label names, is kept beside it as config.json.
"""

from __future__ import annotations

from pathlib import Path

from .inference import _eval_mode, _quiet, export_in_scratch, save_template

WRAPPER_PREFIX = "model."


def export_classifier_template(model, task: str, classifier_modules: tuple[str, ...], out_dir: Path, opset: int = 17) -> dict:
    """Export `model` (a transformers classifier without adapters) to `out_dir/model.onnx` (+ .data).

    Returns the manifest's `inference` section (`model` and `config` relative to the bundle); its
    `weights` map every linear weight and the classifier head's bias to their initializers.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph_model = export_in_scratch(out_dir, lambda path: _torch_export(model, task, path, opset))
    _strip_prefix(graph_model, WRAPPER_PREFIX)
    biases = _head_biases(model, classifier_modules, graph_model)
    section = save_template(model, graph_model, out_dir)
    section["weights"].update(biases)
    return section


def _torch_export(model, task: str, path: Path, opset: int) -> None:
    import torch

    from .activations import export_friendly_activations
    from .attention import export_friendly_attention
    from .onnx_export import export_patches

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask):
            output = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return output["logits"] if isinstance(output, dict) else output.logits

    input_ids = torch.ones((2, 8), dtype=torch.int64)
    attention_mask = torch.ones((2, 8), dtype=torch.int64)
    attention_mask[-1, -2:] = 0
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"} if task == "token-cls" else {0: "batch"}}
    with (torch.no_grad(), _quiet(), _eval_mode(model), export_patches(model), export_friendly_activations(model),
          export_friendly_attention(model)):
        torch.onnx.export(
            Logits(model), (input_ids, attention_mask), str(path), dynamo=False, opset_version=opset,
            input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=axes,
            do_constant_folding=False, keep_initializers_as_inputs=True,
        )


def _strip_prefix(graph_model, prefix: str) -> None:
    """Rename `model.X` initializers (and their graph inputs and readers) to `X`: the HF parameter names."""
    renames = {}
    for tensor in graph_model.graph.initializer:
        if tensor.name.startswith(prefix):
            renames[tensor.name] = tensor.name[len(prefix):]
            tensor.name = renames[tensor.name]
    for value in graph_model.graph.input:
        value.name = renames.get(value.name, value.name)
    for node in graph_model.graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]


def _head_biases(model, classifier_modules: tuple[str, ...], graph_model) -> dict[str, dict]:
    """{`classifier.bias`: {initializer, layout}} for each classifier head with a bias (trained in full)."""
    initializers = {tensor.name for tensor in graph_model.graph.initializer}
    biases = {}
    for module_name in classifier_modules:
        module = model.get_submodule(module_name) if hasattr(model, module_name) else None
        if module is None or getattr(module, "bias", None) is None:
            continue
        name = f"{module_name}.bias"
        if name not in initializers:
            raise RuntimeError(f"the classifier export has no initializer {name}")
        biases[name] = {"initializer": name, "layout": "out_in"}
    return biases
