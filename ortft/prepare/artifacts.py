"""Generate ORT training artifacts (training, eval, optimizer graphs + checkpoint) from a loss graph.

Only the adapter tensors require gradients; every other initializer is frozen. AdamW carries the
weight decay and gradient-norm clipping chosen at prepare time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..graph.eval_dropout import DisableDropout
from ..graph.optional_outputs import AddOptionalOutputs
from ..graph.pretranspose import PretransposeFrozenWeights
from ..quiet import native_stderr_captured

log = logging.getLogger(__name__)

TWO_GB = 2**31 - 1


def optimizer_block(weight_decay: float, max_grad_norm: float | None):
    from onnxruntime.training import onnxblock

    clip = onnxblock.optim.ClipGradNorm(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else None
    return onnxblock.optim.AdamW(weight_decay=weight_decay, clip_grad=clip)


def prepare_loss_graph(model) -> int:
    """Passes that the gradient builder needs; returns how many nodes were patched."""
    return AddOptionalOutputs().call(model).count


def needs_external_data(model) -> bool:
    return model.ByteSize() > TWO_GB // 2


def generate(
    model,
    trainable: list[str],
    out_dir: Path,
    weight_decay: float,
    max_grad_norm: float | None,
    external_data: bool | None,
    work_dir: Path,
    verbose: bool = False,
) -> dict:
    """Write training_model.onnx, eval_model.onnx, optimizer_model.onnx and checkpoint to `out_dir`.

    Returns what the graph passes changed (for the manifest).
    """
    import onnx
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    trainable_set = set(trainable)
    pretransposed = PretransposeFrozenWeights(trainable_set).call(model).count
    frozen = [init.name for init in model.graph.initializer if init.name not in trainable_set and _is_float(init)]
    missing = trainable_set - {init.name for init in model.graph.initializer}
    if missing:
        raise RuntimeError(f"trainable tensors absent from the exported graph: {sorted(missing)[:5]}")
    use_external = needs_external_data(model) if external_data is None else external_data
    source = model
    if use_external:
        # Graphs past ONNX's 2 GB protobuf limit must travel as a path with external data.
        work_dir.mkdir(parents=True, exist_ok=True)
        path = work_dir / "loss_graph.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="loss_graph.onnx.data", size_threshold=1024)
        source = str(path)
    with native_stderr_captured(enabled=not verbose):
        _generate_artifacts(artifacts, source, trainable_set, frozen, weight_decay, max_grad_norm, out_dir)
    eval_path = out_dir / "eval_model.onnx"
    eval_model = onnx.load(str(eval_path), load_external_data=False)
    dropout_off = DisableDropout().call(eval_model).count
    if dropout_off:
        onnx.save_model(eval_model, str(eval_path))
    return {"pretransposed_frozen_weights": pretransposed, "eval_dropout_disabled": dropout_off}


def _generate_artifacts(artifacts, source, trainable_set, frozen, weight_decay, max_grad_norm, out_dir) -> None:
    artifacts.generate_artifacts(
        source,
        requires_grad=sorted(trainable_set),
        frozen_params=frozen,
        loss=None,
        optimizer=optimizer_block(weight_decay, max_grad_norm),
        artifact_directory=str(out_dir),
    )


def _is_float(initializer) -> bool:
    from onnx import TensorProto

    return initializer.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
