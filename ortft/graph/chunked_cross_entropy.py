"""Replace ORT's SoftmaxCrossEntropyLoss by a log-sum-exp written in plain ops, in row chunks.

ORT's CPU kernel for SoftmaxCrossEntropyLoss runs on one thread: on SmolLM2's 49k vocabulary at
1020 labelled positions it took 0.30 s forward and 0.12 s for its gradient in isolation (0.54 s +
0.15 s inside a training step, 13% of the step), while ReduceMax, Sub, Exp and ReduceSum over the same
[1020, 49152] logits take ~6-14 ms each. This pass writes the same loss as

    m    = float(int(max_j x_ij))          (a stabiliser: the Cast to int32 stops the gradient)
    lse  = log(sum_j exp(x_ij - m)) + m
    loss = sum over counted rows of (lse_i - x_i,y_i) / number of counted rows

which is exact (no floor on probabilities), and whose gradient ORT builds from threaded elementwise
kernels: softmax(x) - onehot(y), divided by the count. Rows whose label is the ignore index are
masked as SoftmaxCrossEntropyLoss masks them; a batch without a counted row has loss 0, not NaN.

The rows are cut into `chunks` slices. When the logits come from an LM head read by nothing else (a
Gemm, or a MatMul of a 2-D input; Casts between head and loss move along), the head runs per slice too, so only
one slice's logits and their temporaries exist at a time (the exp() kept for the backward pass is
as large as the log-probabilities SoftmaxCrossEntropyLoss kept). Empty slices (fewer rows than
chunks) are fine: every op here accepts zero rows, and the row reductions are reshaped to [rows, 1]
because ORT's CPU reductions return an empty input unreduced.
"""

from __future__ import annotations

from .base import GraphPass, PassResult, consumers_of, producers_of
from .transpose_into_gemm import declared_ranks, inferred_ranks
from .upgrade_opset import default_opset

CHUNKED_LOSS_PREFIX = "ortft_chunked_loss"


def _is_head(node, ranks: dict[str, int]) -> bool:
    """A product that can run per slice of rows: Gemm without transA/alpha, or MatMul of a 2-D input."""
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Gemm":
        return not _attribute(node, "transA", 0) and _attribute(node, "alpha", 1.0) == 1.0 and (
            len(node.input) < 3 or not node.input[2])
    return node.op_type == "MatMul" and ranks.get(node.input[0]) == 2


def _copy(node, inputs: list[str], output: str):
    """`node` with other inputs and a single output of its own name."""
    from onnx import helper

    return helper.make_node(node.op_type, inputs, [output], name=output, domain=node.domain,
                            **{a.name: helper.get_attribute_value(a) for a in node.attribute})


def _attribute(node, name, default=None):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


class ChunkedCrossEntropy(GraphPass):
    """Rewrite every mean-reduced, unweighted SoftmaxCrossEntropyLoss (meant for LM heads: the caller
    applies it to causal-LM loss graphs only; a classifier's few classes gain nothing)."""

    def __init__(self, chunks: int = 8, min_rows: int = 1):
        if chunks < 1:
            raise ValueError(f"chunks must be at least 1, got {chunks}")
        if min_rows < 1:
            raise ValueError(f"min_rows must be at least 1, got {min_rows}")
        self.chunks = chunks
        self.min_rows = min_rows

    def call(self, model) -> PassResult:
        graph = model.graph
        producers = producers_of(graph)
        consumers = consumers_of(graph)
        ranks = None
        count = 0
        for loss in [node for node in graph.node if node.op_type == "SoftmaxCrossEntropyLoss"]:
            if len(loss.input) > 2 and loss.input[2]:
                continue  # class weights: keep ORT's op
            if _attribute(loss, "reduction", b"mean") not in (b"mean", "mean"):
                continue
            if any(consumers.get(name) for name in loss.output[1:] if name):
                continue  # something reads the log-probabilities
            casts = []  # torch exports logits.float() as a Cast, even of float logits
            head = producers.get(loss.input[0])
            while head is not None and head.op_type == "Cast" and len(consumers.get(head.output[0], [])) == 1:
                casts.insert(0, head)
                head = producers.get(head.input[0])
            if head is not None and head.op_type == "MatMul" and ranks is None:
                ranks = {**inferred_ranks(model), **declared_ranks(graph)}
            if len(consumers.get(head.output[0] if head is not None else "", [])) != 1 or not _is_head(head, ranks or {}):
                head, casts = None, []  # the logits are sliced instead: same loss, the full logits exist once
            self._rewrite(model, loss, head, casts, count)
            count += 1
        return PassResult(model, bool(count), count)

    def _rewrite(self, model, loss, head, casts: list, index: int) -> None:
        """Replace `loss` (and `head` and the `casts` between them, when given) by the chunked log-sum-exp."""
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        graph = model.graph
        opset = default_opset(model)
        prefix = f"{CHUNKED_LOSS_PREFIX}{index}"
        ignore_index = _attribute(loss, "ignore_index")
        nodes = []

        def name(suffix: str) -> str:
            return f"{prefix}/{suffix}"

        def constant(suffix: str, value, dtype) -> str:
            tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name(suffix))
            graph.initializer.append(tensor)
            return tensor.name

        def node(op_type, inputs, suffix, **attributes) -> str:
            output = name(suffix)
            nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
            return output

        def reduce(op_type, data, suffix, axes=None, keepdims=1) -> str:
            """ReduceSum takes its axes as an input from opset 13, ReduceMax from opset 18."""
            if opset >= (13 if op_type == "ReduceSum" else 18):
                axes_input = [constant(f"{suffix}_axes", axes, np.int64)] if axes is not None else []
                return node(op_type, [data] + axes_input, suffix, keepdims=keepdims)
            return node(op_type, [data], suffix, keepdims=keepdims, **({"axes": axes} if axes is not None else {}))

        def column(data, suffix) -> str:
            return node("Unsqueeze", [data, constant(f"{suffix}_axis", [1], np.int64)], suffix)

        labels = loss.input[1]
        rows = node("Shape", [head.input[0] if head is not None else loss.input[0]], "rows", start=0, end=1)
        rows_up = node("Add", [rows, constant("round_up", [self.chunks - 1], np.int64)], "rows_up")
        even_rows = node("Div", [rows_up, constant("chunks", [self.chunks], np.int64)], "even_rows")
        chunk_rows = node("Max", [even_rows, constant("min_rows", [self.min_rows], np.int64)], "chunk_rows")
        # Slice boundaries as one vector, so no per-slice Mul looks like an activation worth recomputing.
        boundaries = node("Mul", [chunk_rows, constant("slice_numbers", np.arange(self.chunks + 1), np.int64)], "boundaries")
        axis0 = constant("axis0", [0], np.int64)
        one = constant("one", [1], np.int64)
        never = np.iinfo(np.int64).min  # without ignore_index every row counts (labels are class indices >= 0)
        ignored = node("Equal", [labels, constant("ignore_index", never if ignore_index is None else ignore_index, np.int64)],
                       "ignored")
        valid = node("Not", [ignored], "valid")
        safe_labels = node("Where", [valid, labels, constant("label0", 0, np.int64)], "safe_labels")
        weights = node("Cast", [valid], "valid_float", to=TensorProto.FLOAT)
        bounds = [node("Slice", [boundaries, constant(f"bound{i}_from", [i], np.int64),
                                 constant(f"bound{i}_to", [i + 1], np.int64)], f"bound{i}") for i in range(self.chunks + 1)]
        partials = []
        for chunk in range(self.chunks):
            tag = f"chunk{chunk}"
            start, end = bounds[chunk], bounds[chunk + 1]
            if head is not None:
                hidden = node("Slice", [head.input[0], start, end, axis0], f"{tag}_hidden")
                logits = name(f"{tag}_logits")
                nodes.append(_copy(head, [hidden] + list(head.input[1:]), logits))
                for number, cast in enumerate(casts):
                    cast_output = name(f"{tag}_logits_cast{number}")
                    nodes.append(_copy(cast, [logits], cast_output))
                    logits = cast_output
            else:
                logits = node("Slice", [loss.input[0], start, end, axis0], f"{tag}_logits")
            # ORT 1.19 returns an empty input's shape unreduced ([0, vocab]): the Reshape makes it [rows, 1].
            row_shape = node("Concat", [node("Shape", [logits], f"{tag}_rows", start=0, end=1), one], f"{tag}_row_shape",
                             axis=0)
            peak = node("Reshape", [reduce("ReduceMax", logits, f"{tag}_max_reduced", [-1]), row_shape], f"{tag}_max")
            truncated = node("Cast", [peak], f"{tag}_max_int", to=TensorProto.INT32)  # no gradient through here
            stabiliser = node("Cast", [truncated], f"{tag}_stabiliser", to=TensorProto.FLOAT)
            exp = node("Exp", [node("Sub", [logits, stabiliser], f"{tag}_shifted")], f"{tag}_exp")
            exp_sum = node("Reshape", [reduce("ReduceSum", exp, f"{tag}_sum_reduced", [-1]), row_shape], f"{tag}_sum")
            log_sum = node("Log", [exp_sum], f"{tag}_log_sum")
            logsumexp = node("Add", [log_sum, stabiliser], f"{tag}_logsumexp")
            chunk_labels = node("Slice", [safe_labels, start, end, axis0], f"{tag}_labels")
            target = node("GatherElements", [logits, column(chunk_labels, f"{tag}_label_column")], f"{tag}_target", axis=1)
            row_loss = node("Sub", [logsumexp, target], f"{tag}_row_loss")
            row_weight = column(node("Slice", [weights, start, end, axis0], f"{tag}_weights"), f"{tag}_weight_column")
            partials.append(reduce("ReduceSum", node("Mul", [row_loss, row_weight], f"{tag}_masked"), f"{tag}_total",
                                   keepdims=0))
        total = partials[0]
        for chunk, partial in enumerate(partials[1:], start=1):
            total = node("Add", [total, partial], f"total{chunk}")
        counted = node("Max", [reduce("ReduceSum", weights, "counted_rows", keepdims=0),
                               constant("at_least_one", 1.0, np.float32)], "counted")
        nodes.append(helper.make_node("Div", [total, counted], [loss.output[0]], name=name("mean")))

        removed = {loss.output[0]} | ({node.output[0] for node in [head, *casts]} if head is not None else set())
        kept = [existing for existing in graph.node if existing.output[0] not in removed]
        # The new nodes go where the loss was: every input they read (labels included) exists by then.
        position = next(i for i, existing in enumerate(graph.node) if existing.output[0] == loss.output[0])
        position -= sum(1 for existing in list(graph.node)[:position] if existing.output[0] in removed)
        del graph.node[:]
        graph.node.extend(kept[:position] + nodes + kept[position:])
