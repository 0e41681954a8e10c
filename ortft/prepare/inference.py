"""Export the BASE causal LM (no adapters) as an ONNX inference model with KV cache: the export template.

Weights stay initializers named as Hugging Face parameters, so `ortft export` can fold adapters into them.
The source model's configuration is kept beside it (config.json): exports give it to runtimes that read
one (Optimum, lm-eval), and the GGUF export takes rope and norm settings from it.
Llama-style attention is exported in its cheaper form (ortft/prepare/attention.py): with grouped-query
attention the cached keys and values are no longer copied to every query head at each generated token.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
CONFIG_FILE = "config.json"
# Keys of a config that describe how the source checkpoint was stored, not the model (a GGUF's quantization).
CONFIG_KEYS_DROPPED = ("quantization_config", "_name_or_path", "_model_name_or_path")
RAW_EXPORT_DIR = ".raw-export"
ONNX_DTYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool", 11: "float64"}


def export_inference_template(model, out_dir: Path, opset: int = 17) -> dict:
    """Export `model` (a transformers causal LM without adapters) to `out_dir/model.onnx` (+ .data).

    Returns the manifest's `inference` section; `model` paths in it are relative to the bundle.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_config = _onnx_config(model)
    graph_model = export_in_scratch(out_dir, lambda path: _torch_export(model, onnx_config, path, opset))
    return {
        **save_template(model, graph_model, out_dir),
        "num_layers": int(model.config.num_hidden_layers),
        "num_key_value_heads": _num_key_value_heads(model.config),
        "head_dim": _head_dim(model.config),
    }


def export_in_scratch(out_dir: Path, export):
    """Run `export(path)` into a scratch folder of `out_dir` and load what it wrote (with its weights).

    torch writes a model over 2 GB as one file per weight beside the .onnx; the scratch folder keeps
    those out of the bundle (a 1.1B model's template was stored twice, 8.8 GB instead of 4.4).
    """
    import onnx

    scratch = Path(out_dir) / RAW_EXPORT_DIR
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        export(scratch / MODEL_FILE)
        return onnx.load(str(scratch / MODEL_FILE))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_template(model, graph_model, out_dir: Path) -> dict:
    """Save an exported template into `out_dir` (model.onnx, one external data file, config.json); returns the
    `inference` section's model, config, weights (every nn.Linear weight's initializer), inputs and outputs."""
    _drop_initializer_inputs(graph_model)
    weights = linear_weight_map(model, graph_model)
    _save_external(graph_model, out_dir)
    (Path(out_dir) / CONFIG_FILE).write_text(json.dumps(model_config_dict(model), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {
        "model": f"inference/{MODEL_FILE}",
        "config": f"inference/{CONFIG_FILE}",
        "weights": weights,
        "inputs": _describe_values(graph_model.graph.input),
        "outputs": _describe_values(graph_model.graph.output),
    }


def model_config_dict(model) -> dict:
    """The model's configuration as a config.json, every setting spelled out (rope_theta, rms_norm_eps, ...
    even where they equal transformers' defaults: readers without transformers need them), for float32."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    for key in CONFIG_KEYS_DROPPED:
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    config["use_cache"] = True
    config["model_type"] = model.config.model_type
    return config


def _onnx_config(model):
    """Optimum's ONNX config for text generation with the past key/values as inputs and position ids."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the model configs)
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        "onnx", model, task="text-generation", library_name="transformers"
    )
    onnx_config = constructor(model.config, task="text-generation", use_past=True, use_past_in_inputs=True)
    if "position_ids" not in onnx_config.inputs:
        onnx_config.__class__ = _with_position_ids(type(onnx_config))
    return onnx_config


def _with_position_ids(config_class):
    """A subclass of an Optimum config that also takes `position_ids` (Gemma's config leaves it out)."""

    class WithPositionIds(config_class):
        @property
        def inputs(self):
            inputs = dict(super().inputs)
            inputs["position_ids"] = {0: "batch_size", 1: "sequence_length"}
            return inputs

    return WithPositionIds


def _torch_export(model, onnx_config, path: Path, opset: int) -> None:
    """torch.onnx.export under Optimum's model patching, without folding or deduplicating weights.

    `keep_initializers_as_inputs=True` stops torch from merging initializers with equal values
    (e.g. two all-ones norms), so every parameter keeps its own initializer and its HF name.
    """
    import torch

    from .attention import export_friendly_attention

    model_kwargs = {"logits_to_keep": 0} if "logits_to_keep" in _forward_parameters(model) else {}
    overrides = {"return_dict": True, **(onnx_config.values_override or {})}
    dummy_inputs = onnx_config.rename_ambiguous_inputs(onnx_config.generate_dummy_inputs(framework="pt"))
    with (
        torch.no_grad(),
        _quiet(),
        _eval_mode(model),
        _config_overrides(model.config, overrides),
        onnx_config.patch_model_for_export(model, model_kwargs=model_kwargs),
        export_friendly_attention(model),
    ):
        input_axes = onnx_config.ordered_inputs(model)
        output_axes = onnx_config.outputs
        torch.onnx.export(
            model,
            (dummy_inputs,),
            f=str(path),
            input_names=list(input_axes),
            output_names=list(output_axes),
            dynamic_axes={**input_axes, **output_axes},
            do_constant_folding=False,
            keep_initializers_as_inputs=True,
            opset_version=opset,
            dynamo=False,
        )


def _forward_parameters(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


@contextlib.contextmanager
def _eval_mode(model):
    """Put `model` in eval mode for the export and give back the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _config_overrides(config, overrides: dict):
    """Set config attributes for the export (use_cache, return_dict) and restore them afterwards."""
    missing = object()
    saved = {key: getattr(config, key, missing) for key in overrides}
    for key, value in overrides.items():
        setattr(config, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is missing:
                delattr(config, key)
            else:
                setattr(config, key, value)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's tracer warnings and prints (the user asked for a bundle, not a trace log)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _drop_initializer_inputs(graph_model) -> None:
    """Remove the graph inputs that only exist because of keep_initializers_as_inputs."""
    initializer_names = {tensor.name for tensor in graph_model.graph.initializer}
    real_inputs = [value for value in graph_model.graph.input if value.name not in initializer_names]
    del graph_model.graph.input[:]
    graph_model.graph.input.extend(real_inputs)


def linear_weight_map(model, graph_model) -> dict[str, dict]:
    """{HF parameter name: {initializer, layout}} for every nn.Linear weight (tied heads included).

    A tied LM head points at the embedding's initializer. Layout `out_in` means the initializer is
    stored like the HF parameter, [out_features, in_features]; `in_out` means transposed.
    """
    import torch

    initializers = {tensor.name: list(tensor.dims) for tensor in graph_model.graph.initializer}
    name_by_pointer = {}
    for name, param in model.named_parameters():
        name_by_pointer.setdefault(param.data_ptr(), name)
    weights = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        hf_name = f"{module_name}.weight"
        initializer = name_by_pointer.get(module.weight.data_ptr())
        if initializer not in initializers:
            raise RuntimeError(f"the inference export has no initializer for {hf_name} (looked for {initializer})")
        weights[hf_name] = {"initializer": initializer, "layout": _layout(list(module.weight.shape), initializers[initializer])}
    return weights


def _layout(hf_shape: list[int], initializer_shape: list[int]) -> str:
    if initializer_shape == hf_shape:
        return "out_in"
    if initializer_shape == hf_shape[::-1]:
        return "in_out"
    raise RuntimeError(f"initializer shape {initializer_shape} does not match weight shape {hf_shape}")


def _save_external(graph_model, out_dir: Path) -> None:
    """Save with every initializer in one external file, so export can patch weights in place."""
    import onnx

    (out_dir / DATA_FILE).unlink(missing_ok=True)
    onnx.save_model(
        graph_model,
        str(out_dir / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=0,
        convert_attribute=False,
    )


def _describe_values(values) -> list[dict]:
    described = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in tensor_type.shape.dim]
        described.append({"name": value.name, "dtype": ONNX_DTYPE_NAMES.get(tensor_type.elem_type, str(tensor_type.elem_type)), "shape": shape})
    return described


def _num_key_value_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else int(config.hidden_size // config.num_attention_heads)
