"""Which graph passes prepare runs on which graph, in what order, and how their counts reach the manifest.

Three stages, each a PassManager (ortft/graph/pipeline.py) over one graph, loaded and saved once:
- `loss_graph_stage`: the exported loss graph, in memory, before ORT's gradient builder sees it;
- `training_graph_stage`, `eval_graph_stage`: the builder's two graphs, after it; LowerTrainingOps, then
  DelayRecomputation (training graph) and PortableOps last.
Adding a pass is one line in a list below. The manifest records every stage's {pass: count} as `passes`
and, from those, the `graph_patches` keys bundles have always had (`graph_patches`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..graph.add_optional_outputs import AddOptionalOutputs
from ..graph.base import GraphPass, PassResult, float_initializer_bytes
from ..graph.blocked_attention import BlockedAttention
from ..graph.chunked_cross_entropy import ChunkedCrossEntropy
from ..graph.delay_recomputation import DelayRecomputation
from ..graph.disable_dropout import DisableDropout
from ..graph.externalize_inputs import ExternalizeInputs
from ..graph.lower_training_ops import LowerTrainingOps
from ..graph.portable_ops import PortableOps
from ..graph.pipeline import PassManager
from ..graph.pretranspose_frozen_weights import PretransposeFrozenWeights
from ..graph.quantize_weights import (
    EXACT_BLOCK_SIZE,
    NODE_PREFIX,
    QuantizeWeights,
    embedding_weights,
    linear_weights,
)
from ..graph.recompute_activations import RecomputeActivations
from ..graph.recompute_dequantize import RecomputeDequantize
from ..graph.recompute_norms import RecomputeNorms
from ..graph.scale_lora_intermediate import ScaleLoraIntermediate
from ..graph.share_dequantized import ShareDequantized
from ..graph.share_lora_input import ShareLoraInput
from ..graph.transpose_into_gemm import TransposeIntoGemm
from ..graph.upgrade_opset import UpgradeOpset, default_opset
from ..bundle import EVAL_GRAPH, TRAINING_GRAPH

if TYPE_CHECKING:
    from .artifacts import Quantization

LOSS_GRAPH_STAGE = "loss_graph"
INT4_OPSET = 21  # DequantizeLinear with int4 and block_size (and int8 in blocks)


def loss_graph_stage(trainable: set[str], quantization: Quantization | None, loss_chunks: int,
                     loss_chunk_rows: int) -> PassManager:
    """The loss graph's passes: what ORT's gradient builder needs, and what makes the step cheaper."""
    int4 = quantization is not None and quantization.scheme == "int4"
    return PassManager(LOSS_GRAPH_STAGE, [
        AddOptionalOutputs(),
        ScaleLoraIntermediate(),
        ShareLoraInput(trainable),
        PretransposeFrozenWeights(trainable),
        TransposeIntoGemm(),  # a tied LM head: Gemm(transB=1) on the table itself
        UpgradeOpset(INT4_OPSET) if int4 else None,
        QuantizeChosenWeights(trainable, quantization) if quantization is not None else None,
        ChunkedCrossEntropy(loss_chunks, loss_chunk_rows) if loss_chunks > 0 else None,
    ])


def training_graph_stage(frozen: ExternalizeInputs, quantized: ExternalizeInputs | None, recompute_dequantized: bool,
                         recompute_activations: bool, attention_chunk_rows: int) -> PassManager:
    """The training graph's passes after the gradient builder; `frozen` / `quantized` place the stored weights."""
    return PassManager(TRAINING_GRAPH, [
        BlockedAttention(attention_chunk_rows) if attention_chunk_rows >= 1 else None,
        frozen,
        quantized,
        RecomputeDequantize(NODE_PREFIX) if quantized is not None and recompute_dequantized else None,
        ShareDequantized() if quantized is not None else None,  # after the clones: each may have readers
        RecomputeActivations() if recompute_activations else None,
        RecomputeNorms() if recompute_activations else None,
        LowerTrainingOps(),
        DelayRecomputation(),  # after the recompute passes and the lowering: clones and forward-only backward nodes wait
        PortableOps(),  # after the lowering and DelayRecomputation (both write Size nodes): OpenVINO's forms
    ])


def eval_graph_stage(frozen: ExternalizeInputs, quantized: ExternalizeInputs | None,
                     attention_chunk_rows: int) -> PassManager:
    """The eval graph's passes after the gradient builder."""
    return PassManager(EVAL_GRAPH, [
        BlockedAttention(attention_chunk_rows) if attention_chunk_rows >= 1 else None,
        frozen,
        quantized,
        ShareDequantized() if quantized is not None else None,
        DisableDropout(),
        LowerTrainingOps(),
        PortableOps(),
    ])


def graph_patches(loss: PassManager, training: PassManager, evaluation: PassManager) -> dict:
    """The manifest's `graph_patches` (keys older than the `passes` record, read by users and tests)."""
    chunked = loss.find("ChunkedCrossEntropy") if loss.count("ChunkedCrossEntropy") else None
    blocked = training.find("BlockedAttention") if training.count("BlockedAttention") else None
    return {
        "optional_outputs_added": loss.count("AddOptionalOutputs"),
        "blocked_attention": training.count("BlockedAttention"),
        "attention_chunk_rows": blocked.chunk_rows if blocked else 0,
        "pretransposed_frozen_weights": loss.count("PretransposeFrozenWeights") + loss.count("TransposeIntoGemm"),
        "loss_chunks": chunked.chunks if chunked else 0,
        "loss_chunk_rows": chunked.min_rows if chunked else 0,
        "lora_scales_moved": loss.count("ScaleLoraIntermediate"),
        "lora_inputs_shared": loss.count("ShareLoraInput"),
        "recomputed_activations": training.count("RecomputeActivations"),
        "recomputed_norms": training.count("RecomputeNorms"),
        "recomputation_delayed": training.count("DelayRecomputation"),
        "eval_dropout_disabled": evaluation.count("DisableDropout"),
        "lowered_training_ops": {TRAINING_GRAPH: training.details("LowerTrainingOps"),
                                 EVAL_GRAPH: evaluation.details("LowerTrainingOps")},
    }


def quantization_targets(model, trainable: set[str], settings: Quantization) -> list[str]:
    """Graph names of the frozen weights to quantize, in graph order."""
    tables = set(embedding_weights(model))
    chosen = []
    for name in linear_weights(model):
        if name in trainable or name in tables:
            continue
        head = "lm_head." in name
        if (head and settings.embeddings) or (not head and (settings.all_linear or name.endswith(".base_layer.weight"))):
            chosen.append(name)
    if settings.embeddings:
        chosen.extend(name for name in tables if name not in trainable)
    return chosen


def exact_targets(model, trainable: set[str], settings: Quantization) -> list[str]:
    """Without --quantize-embeddings: the embedding tables (a tied LM head is the same tensor) whose values
    are exactly int8 x a scale per 32 values (a GGUF's Q8_0 table), to be stored that way, losslessly
    (QuantizeWeights' exact_names)."""
    from onnx import numpy_helper

    from ..quantize import quantize_int8_exact

    if settings.embeddings:
        return []
    tables = set(embedding_weights(model)) - trainable
    return [tensor.name for tensor in model.graph.initializer if tensor.name in tables
            and quantize_int8_exact(numpy_helper.to_array(tensor), 1, EXACT_BLOCK_SIZE) is not None]


class QuantizeChosenWeights(GraphPass):
    """QuantizeWeights on the frozen weights `settings` chooses, chosen when the pass runs (after the
    passes before it have rewritten the graph); keeps the quantizer (its tensors and per-layer errors)
    and the frozen float bytes before it, for the bundle's quantized_weights.data and manifest."""

    def __init__(self, trainable: set[str], settings: Quantization):
        self.trainable = trainable
        self.settings = settings
        self.quantizer: QuantizeWeights | None = None
        self.frozen_bytes_before = 0

    @property
    def name(self) -> str:
        return "QuantizeWeights"

    def call(self, model) -> PassResult:
        settings = self.settings
        self.frozen_bytes_before = float_initializer_bytes(model, self.trainable)
        exact = exact_targets(model, self.trainable, settings)
        if exact and default_opset(model) < INT4_OPSET:
            UpgradeOpset(INT4_OPSET).call(model)  # int8 in blocks (an --quantize int8 bundle's exact table) needs opset 21 too
        self.quantizer = QuantizeWeights(quantization_targets(model, self.trainable, settings), settings.scheme,
                                         settings.block_size, settings.symmetric, as_inputs=True, exact_names=exact)
        return self.quantizer.call(model)
