"""Build the bundle's training and eval graphs (standard ONNX) and initial adapter from a loss graph.

Only the adapter tensors get gradients; every other initializer is frozen. ORT's gradient builder makes
the backward graph (in its own environment: gradient_env.py); ortft's passes then rewrite it, and the
last one lowers every training-only op to standard ONNX so that stock onnxruntime trains the bundle. The
optimizer step is ortft's own (ortft/optimizer.py), with the settings the manifest records.

With quantization (QLoRA-style, `Quantization`), the chosen frozen weights are replaced by
DequantizeLinear of int8/int4 tensors before the gradient graph is built. Those tensors travel as
graph inputs through ORT's artifact generation (as Constants it would fold them back into float32)
and then become initializers of the generated training and eval graphs whose bytes are stored once,
in quantized_weights.data. The training graph then gets a second DequantizeLinear per weight for its
backward pass (recompute).

ORT builds the gradient graph from a weightless skeleton: the frozen float weights leave the loss
graph as plain graph inputs (their bytes go, serialized, to a side file) before the builder sees it;
afterwards they become initializers of the generated training and eval graphs whose bytes are stored
once, in frozen_weights.data. The gradient graph does not depend on weight values, and ORT's generator
copies the whole model several times over: a randomly initialised 1.1B Llama (4.4 GB of weights) was
killed at 24 GB in that stage when the weights went with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import ATTENTION_CHUNK_ROWS, PrepareConfig
from ..fsutil import native_write_errors
from ..graph.base import float_initializer_bytes, is_float
from ..graph.blocked_attention import gradient_definitions
from ..graph.externalize_inputs import (
    ExternalizeInputs,
    write_external_blobs,
    write_external_tensors,
)
from ..graph.pipeline import PassManager
from ..graph.quantize_weights import QuantizeWeights
from ..graph.upgrade_opset import default_opset
from ..optimizer import ADAMW_UPDATE  # noqa: F401  (the manifest names the update ortft makes)
from ..bundle import (
    EVAL_GRAPH,
    FROZEN_DATA,
    INITIAL_ADAPTER,
    QUANTIZED_DATA,
    TRAINING_GRAPH,
)
from . import graph_stages

log = logging.getLogger(__name__)

TWO_GB = 2**31 - 1
QUANTIZE_SCHEMES = ("int8", "int4")


@dataclass(frozen=True)
class Quantization:
    """Which frozen weights to quantize and how: a view of PrepareConfig's quantize and quantize_* settings
    (their defaults and meanings live there)."""

    config: PrepareConfig

    @property
    def scheme(self) -> str:  # "int8" | "int4"
        return self.config.quantize

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def symmetric(self) -> bool:
        return self.config.quantize_symmetric

    @property
    def all_linear(self) -> bool:
        return self.config.quantize_all_linear

    @property
    def embeddings(self) -> bool:
        return self.config.quantize_embeddings

    @property
    def recompute(self) -> bool:
        return self.config.quantize_recompute


def needs_external_data(model) -> bool:
    return model.ByteSize() > TWO_GB // 2


@dataclass
class LossGraph:
    """A loss graph with prepare's passes applied, saved to disk: what artifact generation needs.

    The graph travels as a file so that the caller can free its in-memory proto first: protobuf keeps
    the bytes of every rewritten initializer in the model's arena until the whole model is freed, which
    cost ~500 MB of peak RSS on SmolLM2 when the proto went to ORT directly.
    """

    path: Path
    trainable: set[str]
    frozen: list[str]  # float initializers that are not trainable (stored in FROZEN_DATA)
    opset: int
    float_frozen_bytes_after: int
    frozen_store: Path  # the frozen weights, serialized TensorProtos back to back
    frozen_index: list[tuple[str, int, int]]  # (name, offset, length) in frozen_store
    passes: PassManager  # the loss graph stage that ran (ortft/prepare/graph_stages.py): what each pass changed
    quantizer: QuantizeWeights | None = None
    quantization: Quantization | None = None
    frozen_bytes_before: int = 0  # frozen float bytes before quantization (quantized bundles)


def detach_frozen_weights(model, frozen: list[str], store: Path) -> list[tuple[str, int, int]]:
    """Move the `frozen` initializers out of `model` into `store`, leaving typed graph inputs behind.

    Returns the (name, offset, length) index of the serialized TensorProtos; the caller frees the
    model afterwards (protobuf keeps removed bytes until then).
    """
    from onnx import TensorProto, helper

    wanted = set(frozen)
    index = []
    kept = []
    new_inputs = []
    declared = {value.name for value in model.graph.input}
    with open(store, "wb") as handle:
        offset = 0
        for tensor in model.graph.initializer:
            if tensor.name not in wanted:
                kept.append(tensor)
                continue
            if tensor.data_location == TensorProto.EXTERNAL:
                raise RuntimeError(f"frozen weight {tensor.name} is still in an external file: load the graph with its data")
            data = tensor.SerializeToString()
            handle.write(data)
            index.append((tensor.name, offset, len(data)))
            offset += len(data)
            if tensor.name not in declared:
                new_inputs.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(new_inputs)
    return index


def save_loss_graph(model, trainable: list[str], work_dir: Path, external_data: bool | None,
                    quantization: Quantization | None = None, loss_chunks: int = 0,
                    loss_chunk_rows: int = 1) -> LossGraph:
    """Run the loss graph stage (ortft/prepare/graph_stages.py) on `model` in place, set its frozen weights
    aside and save it under `work_dir`.

    `loss_chunks` > 0 replaces ORT's single-threaded SoftmaxCrossEntropyLoss by a log-sum-exp in that
    many row slices of at least `loss_chunk_rows` rows each (ortft/graph/chunked_cross_entropy.py); causal-LM graphs only.
    """
    import onnx

    trainable_set = set(trainable)
    stage = graph_stages.loss_graph_stage(trainable_set, quantization, loss_chunks, loss_chunk_rows)
    stage.run(model)
    quantize = stage.find("QuantizeWeights")
    frozen = [init.name for init in model.graph.initializer if init.name not in trainable_set and is_float(init)]
    missing = trainable_set - {init.name for init in model.graph.initializer}
    if missing:
        raise RuntimeError(f"trainable tensors absent from the exported graph: {sorted(missing)[:5]}")
    float_frozen_bytes_after = float_initializer_bytes(model, trainable_set)
    work_dir.mkdir(parents=True, exist_ok=True)
    frozen_store = work_dir / "frozen_params.pb"
    frozen_index = detach_frozen_weights(model, frozen, frozen_store)
    use_external = needs_external_data(model) if external_data is None else external_data
    path = work_dir / "loss_graph.onnx"
    if use_external:
        # Graphs past ONNX's 2 GB protobuf limit must travel with external data.
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="loss_graph.onnx.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return LossGraph(path, trainable_set, frozen, default_opset(model), float_frozen_bytes_after, frozen_store,
                     frozen_index, stage, quantize.quantizer if quantize else None, quantization,
                     quantize.frozen_bytes_before if quantize else 0)


def generate(
    loss_graph: LossGraph,
    out_dir: Path,
    verbose: bool = False,
    recompute_activations: bool = True,
    attention_chunk_rows: int = ATTENTION_CHUNK_ROWS,
) -> dict:
    """Write training_model.onnx, eval_model.onnx (standard ONNX) and initial_adapter.safetensors to `out_dir`.

    ORT's gradient builder runs in its own environment (gradient_env.py, a subprocess); then the frozen
    (and quantized) weights go to their data files and each generated graph runs its stage of passes
    (ortft/prepare/graph_stages.py), the lowering of every training-only op last, so that stock
    onnxruntime runs the graphs. Returns the manifest's "graph_patches", "passes" ({stage: {pass: count}}),
    "frozen_weights", "initial_adapter_zeros" (the trainable tensors left out of
    the initial adapter file because they start at zero) and, with quantization, "quantization" (settings, per-layer bytes and errors, frozen
    bytes before/after).
    """
    with native_write_errors():
        run_gradient_builder(loss_graph, out_dir, verbose)
        initial_zeros = _write_initial_adapter(loss_graph, out_dir / INITIAL_ADAPTER)
    frozen, frozen_section = _store_frozen_weights(loss_graph, out_dir)
    quantized = None
    if loss_graph.quantizer is not None:
        offsets = write_external_tensors(loss_graph.quantizer.tensors, out_dir / QUANTIZED_DATA)
        quantized = ExternalizeInputs(loss_graph.quantizer.tensors, QUANTIZED_DATA, offsets)
    recompute_dequantized = loss_graph.quantization is not None and loss_graph.quantization.recompute
    training = graph_stages.training_graph_stage(frozen, quantized, recompute_dequantized, recompute_activations,
                                                 attention_chunk_rows)
    evaluation = graph_stages.eval_graph_stage(frozen, quantized, attention_chunk_rows)
    for stage in (training, evaluation):
        stage.run_file(out_dir / stage.stage)
    result = {"graph_patches": graph_stages.graph_patches(loss_graph.passes, training, evaluation),
              "passes": {stage.stage: stage.counts for stage in (loss_graph.passes, training, evaluation)},
              "frozen_weights": frozen_section, "initial_adapter_zeros": initial_zeros}
    if quantized is not None:
        result["quantization"] = _quantization_section(loss_graph, training, evaluation)
    return result


def run_gradient_builder(loss_graph: LossGraph, out_dir: Path, verbose: bool = False) -> None:
    """ORT's generator on the weightless skeleton (the frozen weights are plain inputs, not parameters),
    in the gradient builder's own environment: ortft's environment holds stock onnxruntime."""
    import json
    import subprocess
    import tempfile

    from .gradient_env import gradient_python

    python = gradient_python()
    worker = Path(__file__).with_name("gradient_worker.py")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ortft-grad-") as scratch:
        names = Path(scratch) / "requires_grad.json"
        names.write_text(json.dumps(sorted(loss_graph.trainable)), encoding="utf-8")
        gradients = Path(scratch) / "gradients.json"  # for ortft's placeholders (ortft/graph/blocked_attention.py)
        gradients.write_text(json.dumps(gradient_definitions()), encoding="utf-8")
        result = subprocess.run([str(python), str(worker), str(loss_graph.path), str(out_dir), str(names), str(gradients)],
                                stdout=None if verbose else subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                                text=True, errors="replace")
    if result.returncode != 0:
        tail = "\n".join(((result.stderr or "") + (result.stdout or "")).strip().splitlines()[-25:])
        if "No space left" in tail or "errno:28" in tail:
            raise OSError(28, f"No space left on device while ORT's gradient builder wrote {out_dir}")
        raise RuntimeError(f"ORT's gradient builder failed (exit {result.returncode}):\n{tail}")


def _quantization_section(loss_graph: LossGraph, training: PassManager, evaluation: PassManager) -> dict:
    """The manifest's "quantization": settings, what the quantizer and the quantized passes did."""
    quantizer, settings = loss_graph.quantizer, loss_graph.quantization
    quantized_bytes = sum(layer["bytes_after"] for layer in quantizer.layers.values())
    return {
        "scheme": settings.scheme,
        "block_size": settings.block_size if settings.scheme == "int4" else None,
        "symmetric": settings.symmetric if settings.scheme == "int4" else True,
        "all_linear": settings.all_linear,
        "embeddings": settings.embeddings or _exact_embeddings(quantizer),
        "opset": loss_graph.opset,
        "recomputed_for_backward": training.count("RecomputeDequantize"),
        "dequantize_shared": {TRAINING_GRAPH: training.count("ShareDequantized"),
                              EVAL_GRAPH: evaluation.count("ShareDequantized")},
        "layers": quantizer.layers,
        "frozen_bytes_before": loss_graph.frozen_bytes_before,
        "frozen_bytes_after": loss_graph.float_frozen_bytes_after + quantized_bytes,
        "max_rel_error": max((layer["max_rel_error"] for layer in quantizer.layers.values()), default=0.0),
        "mean_rel_rms_error": (sum(layer["rel_rms_error"] for layer in quantizer.layers.values()) / len(quantizer.layers))
        if quantizer.layers else 0.0,
    }


def _exact_embeddings(quantizer: QuantizeWeights) -> str | bool:
    """"int8-exact" when an embedding table was stored as lossless int8 (QuantizeWeights' exact_names), else False."""
    exact = any(quantizer.layers.get(name, {}).get("scheme") == "int8-exact" for name in quantizer.exact_names)
    return "int8-exact" if exact else False


def _write_initial_adapter(loss_graph: LossGraph, path: Path) -> list[str]:
    """The trainable tensors' starting values (from the loss graph's initializers) as safetensors, except
    those that are all zeros (LoRA's B matrices), whose names it returns for the manifest
    (ortft/initial_adapter.py fills them in)."""
    import onnx
    from onnx import numpy_helper

    from ..fsutil import write_bytes_atomic
    from ..adapter import adapter_bytes
    from ..initial_adapter import split_zero_tensors

    skeleton = onnx.load(str(loss_graph.path))
    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in skeleton.graph.initializer
              if tensor.name in loss_graph.trainable}
    del skeleton
    stored, zeros = split_zero_tensors(arrays)
    write_bytes_atomic(path, adapter_bytes(stored))
    return zeros


def _store_frozen_weights(loss_graph: LossGraph, out_dir: Path) -> tuple[ExternalizeInputs, dict]:
    """Write the frozen float weights set aside earlier to FROZEN_DATA, one tensor in memory at a time;
    returns the pass that makes them initializers of a generated graph pointing into it, and the
    manifest's "frozen_weights".

    Not in the checkpoint, they are never copied into a run's checkpoints (SmolLM2-135M: 569 MB -> 56 MB
    and ~6 s -> 0.2 s per save), and ORT maps the file's pages instead of reading them into a checkpoint
    state: both sessions share one copy.
    """
    from onnx import TensorProto, numpy_helper

    shapes = {}  # name -> a TensorProto with the type and dims only, what ExternalizeInputs needs

    def frozen_bytes():
        with open(loss_graph.frozen_store, "rb") as handle:
            for name, offset, length in loss_graph.frozen_index:
                handle.seek(offset)
                tensor = TensorProto()
                tensor.ParseFromString(handle.read(length))
                shape = TensorProto()
                shape.name, shape.data_type = name, tensor.data_type
                shape.dims.extend(tensor.dims)
                shapes[name] = shape
                yield name, tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()

    offsets = write_external_blobs(frozen_bytes(), out_dir / FROZEN_DATA)
    section = {"file": FROZEN_DATA, "tensors": len(offsets),
               "bytes": int(sum(length for _offset, length in offsets.values()))}
    return ExternalizeInputs(shapes, FROZEN_DATA, offsets), section
