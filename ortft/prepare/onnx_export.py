"""Export a loss wrapper to an ONNX training graph whose initializers keep PEFT's parameter names.

Uses torch's TorchScript exporter inside Optimum's model patcher (transformers 4.57's mask code
does not trace otherwise; see docs/findings.md), with constant folding off so no parameter is
renamed or folded, in training mode so dropout and friends stay differentiable.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

from . import loss_graph
from .activations import export_friendly_activations
from .attention import export_friendly_attention
from .attention_placeholder import placeholder_attention

log = logging.getLogger(__name__)

WRAPPER_PREFIX = "peft_model."


@contextlib.contextmanager
def export_patches(model):
    """Optimum's patches that make transformers' models traceable; a no-op if Optimum has none."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        constructor = TasksManager.get_exporter_config_constructor(
            "onnx", model, task="text-generation" if not _is_encoder(model) else "text-classification",
            library_name="transformers",
        )
        onnx_config = constructor(model.config)
    except (KeyError, ValueError) as exc:
        log.debug("no Optimum export config for %s: %s", type(model).__name__, exc)
        yield
        return
    with onnx_config.patch_model_for_export(model):
        yield


def _is_encoder(model) -> bool:
    return getattr(model.config, "model_type", "") in ("bert", "roberta", "distilbert", "xlm-roberta")


def export_training_graph(peft_model, task: str, vocab_size: int, path: Path, opset: int, verbose: bool = False,
                          attention_placeholders: bool = False):
    """Export the loss graph of `peft_model` to `path`; returns the loaded onnx.ModelProto and how many
    attention functions were exported in their cheaper form (ortft/prepare/attention.py).

    `attention_placeholders`: causal attention becomes one placeholder node per layer, for
    ortft/graph/blocked_attention.py to replace after the gradient builder (ortft/prepare/attention_placeholder.py).
    """
    import onnx
    import torch

    wrapper = loss_graph.wrapper_for(task, peft_model)
    wrapper.train()
    inputs = loss_graph.example_inputs(task, vocab_size)
    names_in = loss_graph.input_names(task)
    names_out = loss_graph.output_names(task)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in names_in}
    if task == "seq-cls":
        dynamic_axes["labels"] = {0: "batch"}
        dynamic_axes["logits"] = {0: "batch"}
    elif task == "token-cls":
        dynamic_axes["logits"] = {0: "batch", 1: "sequence"}
    base = peft_model.get_base_model()
    with (warnings.catch_warnings(), export_patches(base), export_friendly_activations(base),
          export_friendly_attention(base) as attention_functions_replaced,
          placeholder_attention(base) if attention_placeholders else contextlib.nullcontext(0)):
        if not verbose:
            warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            inputs,
            str(path),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dynamic_axes,
            export_params=True,
        )
    model = onnx.load(str(path))
    strip_wrapper_prefix(model)
    return model, attention_functions_replaced


def strip_wrapper_prefix(model) -> None:
    """Rename initializers `peft_model.X` to `X`, so graph names equal PEFT's named_parameters()."""
    renames = {}
    for initializer in model.graph.initializer:
        if initializer.name.startswith(WRAPPER_PREFIX):
            renames[initializer.name] = initializer.name[len(WRAPPER_PREFIX) :]
            initializer.name = renames[initializer.name]
    if not renames:
        return
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
