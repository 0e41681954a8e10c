"""Lower the training-only ops of ORT's gradient graphs to standard ONNX, so stock onnxruntime runs them.

ORT's gradient builder (onnxruntime-training 1.19.2, the last release) writes backward graphs with ops
whose kernels only its training build has. `LowerTrainingOps` replaces each by standard ONNX ops (or by
contrib ops the stock CPU build has: `STOCK_CONTRIB_OPS`), computing what the training build's CPU
kernel computes. It edits an onnx.ModelProto in place, loaded with or without its external data: it
never reads or writes initializer data, and it keeps the graph's opset and IR version.

The formulas (dY is the incoming gradient, `reduce_to(g, S)` sums g over its broadcast axes down to
shape S, `zeros(S)` is ConstantOfShape(S)):

- InPlaceAccumulatorV2(buffer, g, reset) -> flag: removed. The graph outputs `<param>_grad` = g (this
  micro-batch's gradient, typed like the parameter) instead of `<param>_grad.accumulation.out`; the
  `*.accumulation.buffer` and `lazy_reset_grad` inputs go. Accumulation happens outside the graph.
- ConcatTraining(x_1..x_n; axis) -> (y, lengths): y = Concat(x_1..x_n); lengths = [dim(x_i, axis)]
  (constants when the shapes say so), which only feeds SplitTraining.
- SplitTraining(x, split; axis) -> Split(x, split; axis) (split sizes as an input: opset >= 13).
- SliceGrad(dY, shape, starts, ends, axes, steps) -> dX = zeros(shape) with dX[slice] = dY:
  steps all +-1 (constants): dX = Pad(R(dY), pads), R reversing the axes with step -1; along each axis
  of size d the slice starts at lo = clamp(norm(start), 0, d) for step 1 and at
  lo = clamp(norm(end) + 1, 0, d) for step -1 (norm(i) = i + d if i < 0: ONNX Slice's clamping, which
  also covers INT64_MIN/MAX ends and empty slices); pads = (lo, d - lo - dim(dY)).
  Other steps (e.g. -2, or not constant): the positions P = Slice(Reshape(Range(numel), shape), starts,
  ends, axes, steps) are distinct, and dX = Reshape(ScatterElements(zeros(numel), P, dY), shape).
- GatherGrad(shape, indices, dY; axis) -> dX = zeros(shape) with dX[.., i_k, ..] += dY[.., k, ..]
  (duplicates add up; negative indices i + d): axis 0: dY as rows [K, R], ScatterElements(zeros[d, R],
  Expand(i[:, None], [K, R]), rows, axis=0, reduction=add) reshaped to shape; other axes: the same on dY
  viewed as [P, N, Q] and transposed to [N, P, Q]. (Not ScatterND: OpenVINO's provider accepts only
  ScatterND without reduction.)
- GatherElementsGrad(dY, shape, indices; axis) -> ScatterElements(zeros(shape), i, dY, axis, reduction=add).
- GatherNDGrad(shape, indices, dY; batch_dims = 0) -> ScatterND(zeros(shape), i, dY, reduction=add).
- BroadcastGradientArgs(shape_a, shape_b) -> (axes_a, axes_b): the axes (of the broadcast result,
  descending) along which each input was broadcast: the leading axes the shorter shape lacks, and the
  aligned axes where the dims differ and that input's is 1.
- SoftmaxGrad_13(dY, Y; axis) -> Y * (dY - ReduceSum(dY * Y, axis)); SoftmaxGrad (opset < 13 Softmax):
  the same on the 2-D view Flatten(., axis).
- LogSoftmaxGrad_13(dY, Y; axis) -> dY - Exp(Y) * ReduceSum(dY, axis); LogSoftmaxGrad: on Flatten(., axis).
- SimplifiedLayerNormalizationGrad(dY, X, scale, inv_std) -> with x^ = X * inv_std and
  B = dY * scale * inv_std (the normalized axes are the last rank(scale) ones):
  dX = B - x^ * mean(B * x^), dscale = sum over the leading axes of dY * x^.
- LayerNormalizationGrad(dY, X, scale, mean, inv_std) -> with x^ = (X - mean) * inv_std:
  dX = B - mean(B) - x^ * mean(B * x^), dscale = sum(dY * x^), dbias = sum(dY).
- QuickGeluGrad(dY, X; alpha) -> s = Sigmoid(alpha * X): dX = dY * s * (1 + alpha * X * (1 - s)).
- GeluGrad(dY, X) -> dY * (0.5 * (1 + erf(X / sqrt 2)) + X * exp(-X^2 / 2) / sqrt(2 pi));
  BiasGeluGrad_dX(dY, X, b): the same at X + b.
- FastGeluGrad(dY, X) -> with a = sqrt(2 / pi), t = tanh(a X + a 0.044715 X^3):
  dY * 0.5 * (1 + t + (1 - t^2) * (a X + 3 * 0.044715 a X^3)); BiasFastGeluGrad_dX: at X + b.
- SigmoidGrad(dY, Y) -> dY * Y * (1 - Y); TanhGrad(dY, Y) -> dY * (1 - Y^2);
  ReluGrad(dY, X or Y) -> Where(X > 0, dY, 0); LeakyReluGrad(dY, Y; alpha) -> Where(Y > 0, dY, alpha * dY).
- DivGrad(dY, A, B) -> dA = reduce_to(dY / B, shape A), dB = reduce_to(-(dY * A) / (B * B), shape B).
- DropoutGrad(dY, mask, ratio = 0.5, training_mode = false) -> training: dY * mask / (1 - ratio);
  inference (the forward Dropout dropped nothing): dY. The training build's kernel ignores training_mode
  and always scales by 1 / (1 - ratio); the lowering follows the forward op instead.
- SoftmaxCrossEntropyLossGrad(dY, log_prob, label, weight?, ignore_index?; reduction, ignore_index) and
  ...InternalGrad -> (Exp(log_prob) - OneHot(label)) * w * f along the class axis 1, where
  w = weight[label] (or 1), 0 where label == ignore_index; f = dY (reduction none: per sample; sum)
  or dY / sum(w) (mean; a zero sum divides by 1, as the kernel does).
- SoftmaxCrossEntropyLossInternal(logits, label, weight?, ignore_index?) -> SoftmaxCrossEntropyLoss
  (an ONNX op; stock ORT runs its function body) with the constant ignore_index as the attribute.
- ReduceSumTraining(x, axes; keepdims, noop_with_empty_axes) -> ReduceSum (same signature, opset >= 13).
- Scale(x, s; scale_down) -> x * s, or x / s with scale_down (s cast to x's type).

One standard op changes too. Stock onnxruntime's EliminateDropout (graph optimization level >= basic)
removes every Dropout whose mask output nothing reads, training_mode or not (only training builds check
it): a training Dropout whose gradient the graph does not need (LoRA dropout on the first layer's
input, BERT's embedding dropout) would silently stop dropping. `keep_training_dropouts` makes such a
Dropout's mask the one output in use: y = (x * mask) / (1 - ratio), the kernel's own expression.

`training_only_ops(model)` counts the (domain, op_type) pairs left that stock onnxruntime cannot run;
`LowerTrainingOps` raises RuntimeError when any is left after lowering.
"""

from __future__ import annotations

import collections
import math

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .base import GraphPass, PassResult, names_in_use, producers_of, unique_name

MS_DOMAIN = "com.microsoft"
DEFAULT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
# Contrib ops that the default stock onnxruntime CPU build (pip `onnxruntime`, 1.17 and later) has kernels for.
STOCK_CONTRIB_OPS = {
    MS_DOMAIN: frozenset({
        "Attention", "BiasGelu", "DequantizeLinear", "DynamicQuantizeMatMul", "EmbedLayerNormalization",
        "ExpandDims", "FastGelu", "FusedConv", "FusedGemm", "FusedMatMul", "GatherND", "Gelu",
        "GroupQueryAttention", "MatMulBnb4", "MatMulInteger16", "MatMulIntegerToFloat", "MatMulNBits",
        "MultiHeadAttention", "QuantizeLinear", "QuickGelu", "Range", "RotaryEmbedding",
        "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "TransposeMatMul", "Trilu", "Unique",
    }),
}
# Ops outside ONNX's standard that stock onnxruntime registers in the default domain.
_ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization", "Affine", "Crop", "DynamicSlice", "ImageScaler",
                                     "ParametricSoftplus", "Scale", "ScaledTanh"})
STOCK_DEFAULT_DOMAIN_EXTRAS = {"": _ORT_DEFAULT_DOMAIN_OPS, "ai.onnx": _ORT_DEFAULT_DOMAIN_OPS}
ACCUMULATOR = "InPlaceAccumulatorV2"
BUFFER_SUFFIX = "_grad.accumulation.buffer"
RESET_INPUT = "lazy_reset_grad"
INT64_MIN = -(2 ** 63)
INT64_MAX = 2 ** 63 - 1
SCATTER_REDUCTION_OPSET = 16  # ScatterND / ScatterElements reduction="add"


def training_only_ops(model) -> collections.Counter:
    """(domain, op_type) -> count of the nodes stock onnxruntime has no kernel for (subgraphs included):
    ops of other domains than ONNX's unless STOCK_CONTRIB_OPS lists them, and default-domain ops that are
    neither ONNX's nor one of the few ORT registers there (the training build's SinGrad, say)."""
    from onnx import defs

    left: collections.Counter = collections.Counter()
    for node in _all_nodes(model.graph):
        domain = node.domain or ""
        if domain in DEFAULT_DOMAINS:
            standard_domain = "" if domain == "ai.onnx" else domain
            if defs.has(node.op_type, standard_domain) or node.op_type in STOCK_DEFAULT_DOMAIN_EXTRAS.get(domain, ()):
                continue
        elif node.op_type in STOCK_CONTRIB_OPS.get(domain, ()):
            continue
        left[(domain, node.op_type)] += 1
    return left


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            for subgraph in subgraphs:
                yield from _all_nodes(subgraph)


class LowerTrainingOps(GraphPass):
    """Replace every training-only op by standard ONNX (see the module docstring); in place.

    After `call`, `lowered` maps each lowered op type to its count (InPlaceAccumulatorV2 included).
    """

    def __init__(self):
        self.lowered: dict[str, int] = {}

    def call(self, model) -> PassResult:
        context = _Context(model)
        counts: collections.Counter = collections.Counter()
        removed = remove_accumulators(context)
        if removed:
            counts[ACCUMULATOR] = removed
        kept = keep_training_dropouts(context)
        if kept:
            counts["Dropout"] = kept
        new_nodes, replaced_inputs = [], set()
        for node in model.graph.node:
            lower = LOWERINGS.get((node.domain or "", node.op_type))
            if lower is None:
                new_nodes.append(node)
                continue
            builder = _Builder(context, node)
            lower(node, builder)
            new_nodes.extend(builder.nodes)
            replaced_inputs.update(node.input)
            counts[node.op_type] += 1
        if counts:
            del model.graph.node[:]
            model.graph.node.extend(new_nodes)
            model.graph.initializer.extend(context.new_initializers)
            del context.new_initializers[:]
            drop_unused_constants(model.graph, replaced_inputs)
            drop_stale_value_info(model.graph)
        self.lowered = dict(sorted(counts.items()))
        left = training_only_ops(model)
        if left:
            listing = ", ".join(f"{domain}.{op} x{count}" for (domain, op), count in sorted(left.items()))
            raise RuntimeError(f"stock onnxruntime cannot run these ops, and ortft cannot lower them: {listing}")
        return PassResult(model, bool(counts), sum(counts.values()), dict(self.lowered))


# --- the graph's bookkeeping -------------------------------------------------------------------------


class _Context:
    """What lowering needs to know about the graph: names in use, types and shapes, constants, opset."""

    def __init__(self, model):
        self.model = model
        self.graph = model.graph
        self.opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
        self.types = {}  # name -> (elem_type, [dim value | dim_param | None] or None)
        for value in list(self.graph.input) + list(self.graph.output) + list(self.graph.value_info):
            tensor_type = value.type.tensor_type
            dims = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
                    if tensor_type.HasField("shape") else None)
            self.types[value.name] = (tensor_type.elem_type, dims)
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        for tensor in self.graph.initializer:
            self.types.setdefault(tensor.name, (tensor.data_type, list(tensor.dims)))
        self.constant_nodes = {node.output[0]: node for node in self.graph.node if node.op_type == "Constant"}
        self.names = names_in_use(self.graph)
        self.new_initializers = []
        self._constants = {}

    def fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def elem_type(self, name: str, default: int = TensorProto.FLOAT) -> int:
        found = self.types.get(name)
        return found[0] if found and found[0] else default

    def shape(self, name: str):
        """The static shape of `name` as a list (ints, dim_param strings or None), or None if the rank is unknown."""
        found = self.types.get(name)
        return None if found is None else found[1]

    def constant(self, name: str):
        """The value of `name` as a numpy array when it is an inline initializer or a Constant node, else None."""
        tensor = self.initializers.get(name)
        if tensor is not None:
            if tensor.data_location == TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(tensor)
        node = self.constant_nodes.get(name)
        if node is not None:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def constant_tensor(self, values, elem_type: int) -> str:
        """An initializer holding `values` (shared between uses)."""
        array = np.asarray(values, dtype=helper.tensor_dtype_to_np_dtype(elem_type))
        key = (elem_type, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh(f"ortft_lowered/const{len(self._constants)}")
            self.new_initializers.append(numpy_helper.from_array(array, name))
            self.types[name] = (elem_type, list(array.shape))
            self._constants[key] = name
        return self._constants[key]


class _Builder:
    """Emits the nodes that replace one training-only node; the last ones write the node's own outputs."""

    def __init__(self, context: _Context, node):
        self.context = context
        self.node = node
        self.nodes = []
        self.prefix = f"{node.name or node.output[0]}/lowered"

    @property
    def opset(self) -> int:
        return self.context.opset

    def op(self, op_type: str, inputs, out: str | None = None, domain: str = "", **attributes) -> str:
        """Add a one-output node; returns its output (`out`, or a fresh name)."""
        return self.multi(op_type, inputs, [out] if out else 1, domain, **attributes)[0]

    def multi(self, op_type: str, inputs, outputs, domain: str = "", **attributes) -> list[str]:
        """Add a node with `outputs` (names, or a count of fresh names)."""
        if isinstance(outputs, int):
            outputs = [self.context.fresh(f"{self.prefix}/{op_type}") for _ in range(outputs)]
        name = self.context.fresh(f"{self.prefix}/{op_type}_node")
        node = helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain, **attributes)
        self.nodes.append(node)
        return list(outputs)

    def ints(self, values) -> str:
        return self.context.constant_tensor(np.asarray(values, dtype=np.int64), TensorProto.INT64)

    def scalar(self, value, like: str) -> str:
        """A 0-d constant of `like`'s element type."""
        return self.context.constant_tensor(np.asarray(value), self.context.elem_type(like))

    def reduce(self, op_type: str, x: str, axes, keepdims: int = 1, out: str | None = None) -> str:
        """Reduce* over constant `axes` (None: all), as the graph's opset wants the axes."""
        if axes is None:
            return self.op(op_type, [x], out, keepdims=keepdims)
        if op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18:
            return self.op(op_type, [x, self.ints(list(axes))], out, keepdims=keepdims)
        return self.op(op_type, [x], out, axes=list(axes), keepdims=keepdims)

    def as_int64(self, name: str) -> str:
        if self.context.elem_type(name, TensorProto.UNDEFINED) == TensorProto.INT64:
            return name
        return self.op("Cast", [name], to=TensorProto.INT64)

    def zeros(self, shape: str, like: str) -> str:
        """ConstantOfShape(shape) of `like`'s element type."""
        elem_type = self.context.elem_type(like)
        value = helper.make_tensor("value", elem_type, [1], [0])
        return self.op("ConstantOfShape", [shape], value=value)

    def dim(self, x: str, axis: int) -> str:
        """[x.shape[axis]] as a 1-element int64 tensor (a constant when the shape is static)."""
        shape = self.context.shape(x)
        if shape is not None and -len(shape) <= axis < len(shape) and isinstance(shape[axis], int) and shape[axis] > 0:
            return self.ints([shape[axis]])
        return self.op("Gather", [self.op("Shape", [x]), self.ints([axis])], axis=0)

    def normalize_indices(self, indices: str, size: str) -> str:
        """indices + size where indices < 0 (int64)."""
        indices = self.as_int64(indices)
        negative = self.op("Less", [indices, self.ints(0)])
        return self.op("Where", [negative, self.op("Add", [indices, size]), indices])

    def reduce_to_shape(self, gradient: str, target: str, out: str) -> str:
        """Sum `gradient` over the axes along which `target`'s tensor was broadcast, then reshape to it."""
        gradient_shape, target_shape = self.context.shape(gradient), self.context.shape(target)
        if _same_static_shape(gradient_shape, target_shape):
            return self.op("Identity", [gradient], out)
        shape = self.op("Shape", [target])
        full_rank = self.op("Shape", [self.op("Shape", [gradient])])
        missing = self.op("Sub", [full_rank, self.op("Shape", [shape])])
        ones = self.op("ConstantOfShape", [missing], value=helper.make_tensor("value", TensorProto.INT64, [1], [1]))
        padded = self.op("Concat", [ones, shape], axis=0)
        axes = self.op("Reshape", [self.op("NonZero", [self.op("Equal", [padded, self.ints(1)])]), self.ints([-1])])
        summed = self.op("ReduceSum", [gradient, axes], keepdims=1, noop_with_empty_axes=1)
        return self.op("Reshape", [summed, shape], out)


def _same_static_shape(first, second) -> bool:
    return (first is not None and second is not None and len(first) == len(second)
            and all(a is not None and a == b for a, b in zip(first, second)))


def _attribute(node, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node, index: int) -> str | None:
    """The node's index-th input name, or None if absent or empty."""
    return node.input[index] if len(node.input) > index and node.input[index] else None


def _output(node, index: int) -> str | None:
    return node.output[index] if len(node.output) > index and node.output[index] else None


def _require_opset(builder: _Builder, minimum: int, what: str) -> None:
    if builder.opset < minimum:
        raise RuntimeError(f"lowering {builder.node.op_type} needs {what} (opset >= {minimum}); "
                           f"the graph has opset {builder.opset}")


# --- InPlaceAccumulatorV2: the graph outputs this micro-batch's gradients ------------------------------


def remove_accumulators(context: _Context) -> int:
    """Drop the InPlaceAccumulatorV2 nodes: output `<param>_grad` instead of each accumulator's flag,
    remove the accumulation buffers and lazy_reset_grad from the inputs. Returns how many were removed."""
    graph = context.graph
    accumulators = [node for node in graph.node if node.op_type == ACCUMULATOR and (node.domain or "") == MS_DOMAIN]
    if not accumulators:
        return 0
    inputs = {value.name: value for value in graph.input}
    producers = producers_of(graph)
    graph_outputs = {value.name for value in graph.output}
    replacement_outputs = {}
    aliases = []
    renamed = {}  # gradient tensor -> <param>_grad, where the producing node can write the new name itself
    for node in accumulators:
        buffer, gradient = node.input[0], node.input[1]
        if not buffer.endswith(BUFFER_SUFFIX) or buffer[: -len(BUFFER_SUFFIX)] not in inputs:
            raise RuntimeError(f"{ACCUMULATOR} {node.name}: cannot tell which parameter {buffer} accumulates")
        parameter = inputs[buffer[: -len(BUFFER_SUFFIX)]]
        gradient_name = parameter.name + "_grad"
        if gradient != gradient_name:
            if gradient_name in context.names:
                raise RuntimeError(f"{ACCUMULATOR} {node.name}: {gradient_name} names another tensor")
            producer = producers.get(gradient)
            if producer is not None and gradient not in graph_outputs and gradient not in renamed:
                # The producer writes <param>_grad itself: no Identity in front of the graph output (OpenVINO's
                # provider drops such an Identity and then fails with "Output names mismatch").
                renamed[gradient] = gradient_name
            else:
                alias = context.fresh(gradient_name + "/alias")
                aliases.append(helper.make_node("Identity", [gradient], [gradient_name], name=alias))
            context.names.add(gradient_name)
        value = helper.make_tensor_value_info(gradient_name, parameter.type.tensor_type.elem_type, None)
        value.type.tensor_type.shape.CopyFrom(parameter.type.tensor_type.shape)
        for flag in node.output:
            replacement_outputs[flag] = value
    consumed = {name for node in graph.node if node not in accumulators for name in node.input}
    if consumed & set(replacement_outputs):
        read = sorted(consumed & set(replacement_outputs))
        raise RuntimeError(f"{ACCUMULATOR}'s outputs are read by other nodes: {read[:3]}")
    outputs = [replacement_outputs.get(value.name, value) for value in graph.output]
    kept_nodes = [node for node in graph.node if node not in accumulators]
    still_read = {name for node in kept_nodes + aliases for name in node.input}
    dropped = {node.input[0] for node in accumulators} | {node.input[2] for node in accumulators if len(node.input) > 2}
    kept_inputs = [value for value in graph.input if value.name not in dropped or value.name in still_read]
    for node in kept_nodes + aliases:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
        for index, name in enumerate(node.output):
            if name in renamed:
                node.output[index] = renamed[name]
    for value in graph.value_info:
        if value.name in renamed:
            value.name = renamed[value.name]
    del graph.node[:]
    graph.node.extend(kept_nodes + aliases)
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    return len(accumulators)


def keep_training_dropouts(context: _Context) -> int:
    """Make each training-mode Dropout whose mask nothing reads compute its output from the mask, so
    that stock ORT's EliminateDropout keeps it. Returns how many were rewritten."""
    graph = context.graph
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    new_nodes, changed = [], 0
    for node in graph.node:
        new_nodes.append(node)
        if not _is_unobserved_training_dropout(context, node, read):
            continue
        builder = _Builder(context, node)
        x, output = node.input[0], node.output[0]
        if len(node.output) < 2:
            node.output.append("")
        if not node.output[1]:
            node.output[1] = context.fresh(output + "/mask")
        node.output[0] = context.fresh(output + "/unused")
        ratio = _input(node, 1) or builder.scalar(0.5, x)
        if context.elem_type(ratio, TensorProto.UNDEFINED) != context.elem_type(x):
            ratio = builder.op("Cast", [ratio], to=context.elem_type(x))
        kept = builder.op("Mul", [x, builder.op("Cast", [node.output[1]], to=context.elem_type(x))])
        builder.op("Div", [kept, builder.op("Sub", [builder.scalar(1.0, x), ratio])], output)
        new_nodes.extend(builder.nodes)
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(context.new_initializers)
        del context.new_initializers[:]
    return changed


def _is_unobserved_training_dropout(context: _Context, node, read: set) -> bool:
    if node.op_type != "Dropout" or (node.domain or "") not in ("", "ai.onnx") or context.opset < 12:
        return False
    training = _input(node, 2)
    if training is None:
        return False
    value = context.constant(training)
    if value is not None and not bool(np.asarray(value)):
        return False
    mask = _output(node, 1)
    return mask is None or mask not in read


def drop_unused_constants(graph, candidates: set) -> None:
    """Remove the inline initializers among `candidates` (inputs of lowered nodes, e.g. SliceGrad's steps)
    that nothing reads any more; external ones stay, untouched."""
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    declared = {value.name for value in graph.input}
    unused = {tensor.name for tensor in graph.initializer if tensor.name in candidates and tensor.name not in read
              and tensor.name not in declared and tensor.data_location != TensorProto.EXTERNAL}
    if unused:
        kept = [tensor for tensor in graph.initializer if tensor.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(kept)


def drop_stale_value_info(graph) -> None:
    """Remove value_info entries of tensors no node produces any more."""
    produced = {name for node in graph.node for name in node.output}
    kept = [value for value in graph.value_info if value.name in produced]
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)


# --- concatenation and split ---------------------------------------------------------------------------


def lower_concat_training(node, b: _Builder) -> None:
    axis = _attribute(node, "axis", 0)
    b.op("Concat", node.input, node.output[0], axis=axis)
    lengths = _output(node, 1)
    if lengths:
        b.op("Concat", [b.dim(x, axis) for x in node.input], lengths, axis=0)


def lower_split_training(node, b: _Builder) -> None:
    _require_opset(b, 13, "Split's sizes as an input")
    axis = _attribute(node, "axis", 0)
    split = _input(node, 1)
    if split:
        b.multi("Split", [node.input[0], b.as_int64(split)], list(node.output), axis=axis)
    elif b.opset >= 18:
        b.multi("Split", [node.input[0]], list(node.output), axis=axis, num_outputs=len(node.output))
    else:
        b.multi("Split", [node.input[0]], list(node.output), axis=axis)


# --- SliceGrad -----------------------------------------------------------------------------------------


def lower_slice_grad(node, b: _Builder) -> None:
    steps_name = _input(node, 5)
    steps = b.context.constant(steps_name) if steps_name else None
    axes_name = _input(node, 4)
    if steps_name is None or (steps is not None and set(np.asarray(steps).ravel().tolist()) <= {1, -1}):
        unit_steps = [] if steps is None else [int(step) for step in np.asarray(steps).ravel()]
        _slice_grad_unit_steps(node, b, unit_steps, axes_name)
    else:
        _slice_grad_scatter(node, b)


def _slice_grad_unit_steps(node, b: _Builder, steps: list[int], axes_name: str | None) -> None:
    """dX = Pad(dY reversed along the step -1 axes, pads) with each axis's offset from ONNX's clamping."""
    d_y, shape = node.input[0], node.input[1]
    starts, ends = b.as_int64(node.input[2]), b.as_int64(node.input[3])
    rank = b.op("Shape", [shape])
    if axes_name:
        axes = b.normalize_indices(axes_name, rank)
    else:
        axes = b.op("Range", [b.ints(0), b.op("Size", [starts]), b.ints(1)])
    dims = b.op("Gather", [shape, axes], axis=0)
    lo = _clamped(b, starts, dims, 0)
    negative = [index for index, step in enumerate(steps) if step < 0]
    if negative:
        lo_reversed = _clamped(b, ends, dims, 1)
        mask = b.context.constant_tensor(np.array([step < 0 for step in steps]), TensorProto.BOOL)
        lo = b.op("Where", [mask, lo_reversed, lo])
        reversed_axes = b.op("Gather", [axes, b.ints(negative)], axis=0)
        count = len(negative)
        backwards = b.ints([-1] * count)
        d_y = b.op("Slice", [d_y, backwards, b.ints([INT64_MIN] * count), reversed_axes, backwards])
    lengths = b.op("Gather", [b.op("Shape", [d_y]), axes], axis=0)
    after = b.op("Sub", [b.op("Sub", [dims, lo]), lengths])
    zeros = b.op("ConstantOfShape", [b.op("Mul", [rank, b.ints([2])])],
                 value=helper.make_tensor("value", TensorProto.INT64, [1], [0]))
    positions = b.op("Concat", [axes, b.op("Add", [axes, rank])], axis=0)
    pads = b.op("ScatterElements", [zeros, positions, b.op("Concat", [lo, after], axis=0)], axis=0)
    b.op("Pad", [d_y, pads], node.output[0], mode="constant")


def _clamped(b: _Builder, index: str, dims: str, shift: int) -> str:
    """clamp(index + shift (+ dims if index < 0), 0, dims): where a unit-step slice starts."""
    normalized = b.op("Where", [b.op("Less", [index, b.ints(0)]), b.op("Add", [index, dims]), index])
    if shift:
        normalized = b.op("Add", [normalized, b.ints(shift)])
    return b.op("Min", [b.op("Max", [normalized, b.ints(0)]), dims])


def _slice_grad_scatter(node, b: _Builder) -> None:
    """Any steps: scatter dY to the flat positions the same Slice picks from Range(numel)."""
    d_y, shape = node.input[0], node.input[1]
    numel = b.reduce("ReduceProd", shape, [0], keepdims=0)
    positions = b.op("Reshape", [b.op("Range", [b.ints(0), numel, b.ints(1)]), shape])
    slice_inputs = [positions] + [b.as_int64(name) if name else "" for name in node.input[2:6]]
    while slice_inputs[-1] == "":
        slice_inputs.pop()
    picked = b.op("Reshape", [b.op("Slice", slice_inputs), b.ints([-1])])
    zeros = b.zeros(b.op("Reshape", [numel, b.ints([1])]), d_y)
    flat = b.op("ScatterElements", [zeros, picked, b.op("Reshape", [d_y, b.ints([-1])])], axis=0)
    b.op("Reshape", [flat, shape], node.output[0])


# --- gathers -------------------------------------------------------------------------------------------


def lower_gather_grad(node, b: _Builder) -> None:
    _require_opset(b, SCATTER_REDUCTION_OPSET, "ScatterElements reduction='add'")
    shape, indices, d_y = node.input[0], node.input[1], node.input[2]
    axis = _gather_axis(node, b)
    size = b.op("Gather", [shape, b.ints([axis])], axis=0)
    indices = b.normalize_indices(indices, size)
    count = b.op("Reshape", [b.op("Size", [indices]), b.ints([1])])
    if axis == 0:
        width = b.reduce("ReduceProd", b.op("Slice", [shape, b.ints([1]), b.ints([INT64_MAX])]), [0], keepdims=1)
        rows = b.op("Reshape", [d_y, b.op("Concat", [count, width], axis=0)])
        b.op("Reshape", [_scatter_rows_add(b, indices, rows, size, width), shape], node.output[0])
        return
    # [P, N, Q] view of dY (P: the axes before `axis`, N: the indices, Q: the axes after it), rows first.
    before = b.reduce("ReduceProd", b.op("Slice", [shape, b.ints([0]), b.ints([axis])]), [0], keepdims=1)
    grouped = b.op("Reshape", [d_y, b.op("Concat", [before, count, b.ints([-1])], axis=0)])
    after = b.op("Gather", [b.op("Shape", [grouped]), b.ints([2])], axis=0)
    width = b.op("Mul", [before, after])
    rows = b.op("Reshape", [b.op("Transpose", [grouped], perm=[1, 0, 2]), b.op("Concat", [count, width], axis=0)])
    scattered = b.op("Reshape", [_scatter_rows_add(b, indices, rows, size, width), b.op("Concat", [size, before, after], axis=0)])
    b.op("Reshape", [b.op("Transpose", [scattered], perm=[1, 0, 2]), shape], node.output[0])


def _scatter_rows_add(b: _Builder, indices: str, rows: str, size: str, width: str) -> str:
    """zeros[size, width] with row indices[k] += rows[k] (rows: [K, width]), as ScatterElements(axis 0,
    add) with the indices broadcast along the row: ScatterND's reduction would do the same, but
    OpenVINO's execution provider accepts ScatterND with reduction='none' only."""
    expanded = b.op("Expand", [b.op("Reshape", [indices, b.ints([-1, 1])]), b.op("Shape", [rows])])
    zeros = b.zeros(b.op("Concat", [size, width], axis=0), rows)
    return b.op("ScatterElements", [zeros, expanded, rows], axis=0, reduction="add")


def _gather_axis(node, b: _Builder) -> int:
    """GatherGrad's axis, made non-negative when the data's rank is known (rank(dY) - rank(indices) + 1)."""
    axis = _attribute(node, "axis", 0)
    if axis >= 0:
        return axis
    shape_of_shape = b.context.shape(node.input[0])
    if shape_of_shape and isinstance(shape_of_shape[0], int) and shape_of_shape[0] > 0:
        return axis + shape_of_shape[0]
    d_y_shape, indices_shape = b.context.shape(node.input[2]), b.context.shape(node.input[1])
    if d_y_shape is not None and indices_shape is not None:
        return axis + len(d_y_shape) - len(indices_shape) + 1
    return axis


def lower_gather_elements_grad(node, b: _Builder) -> None:
    _require_opset(b, SCATTER_REDUCTION_OPSET, "ScatterElements reduction='add'")
    d_y, shape, indices = node.input[0], node.input[1], node.input[2]
    axis = _attribute(node, "axis", 0)
    size = b.op("Gather", [shape, b.ints([axis])], axis=0)
    indices = b.normalize_indices(indices, size)
    b.op("ScatterElements", [b.zeros(shape, d_y), indices, d_y], node.output[0], axis=axis, reduction="add")


def lower_gather_nd_grad(node, b: _Builder) -> None:
    _require_opset(b, SCATTER_REDUCTION_OPSET, "ScatterND reduction='add'")
    if _attribute(node, "batch_dims", 0):
        raise RuntimeError(f"{node.op_type} {node.name}: batch_dims > 0 is not supported")
    shape, indices, d_y = node.input[0], b.as_int64(node.input[1]), node.input[2]
    depth = b.op("Gather", [b.op("Shape", [indices]), b.ints([-1])], axis=0)
    sizes = b.op("Slice", [shape, b.ints([0]), depth])
    b.op("ScatterND", [b.zeros(shape, d_y), b.normalize_indices(indices, sizes), d_y], node.output[0], reduction="add")


def lower_broadcast_gradient_args(node, b: _Builder) -> None:
    """The kernel's loop, vectorized over the axes of the broadcast result."""
    shapes = [b.as_int64(node.input[0]), b.as_int64(node.input[1])]
    ranks = [b.op("Shape", [shape]) for shape in shapes]
    rank = b.op("Max", ranks)
    index = b.op("Range", [b.ints(0), b.op("Squeeze", [rank, b.ints([0])]), b.ints(1)])
    one = helper.make_tensor("value", TensorProto.INT64, [1], [1])
    padded, missing = [], []
    for shape, own_rank in zip(shapes, ranks):
        lacking = b.op("Sub", [rank, own_rank])
        padded.append(b.op("Concat", [b.op("ConstantOfShape", [lacking], value=one), shape], axis=0))
        missing.append(b.op("Less", [index, lacking]))
    differ = b.op("Not", [b.op("Equal", padded)])
    is_one = [b.op("Equal", [dims, b.ints(1)]) for dims in padded]
    both = b.op("And", [b.op("Not", [missing[0]]), b.op("Not", [missing[1]])])
    both_differ = b.op("And", [both, differ])
    reduce_a = b.op("And", [both_differ, is_one[0]])
    reduce_b = b.op("And", [both_differ, b.op("And", [b.op("Not", [is_one[0]]), is_one[1]])])
    for own_missing, reduce, out in zip(missing, (reduce_a, reduce_b), (_output(node, 0), _output(node, 1))):
        if out:
            axes = b.op("Reshape", [b.op("NonZero", [b.op("Or", [own_missing, reduce])]), b.ints([-1])])
            b.op("Slice", [axes, b.ints([-1]), b.ints([INT64_MIN]), b.ints([0]), b.ints([-1])], out)


# --- softmax -------------------------------------------------------------------------------------------


def lower_softmax_grad_13(node, b: _Builder) -> None:
    d_y, y = node.input[0], node.input[1]
    axis = _attribute(node, "axis", -1)
    dot = b.reduce("ReduceSum", b.op("Mul", [d_y, y]), [axis], keepdims=1)
    b.op("Mul", [y, b.op("Sub", [d_y, dot])], node.output[0])


def lower_log_softmax_grad_13(node, b: _Builder) -> None:
    d_y, y = node.input[0], node.input[1]
    axis = _attribute(node, "axis", -1)
    total = b.reduce("ReduceSum", d_y, [axis], keepdims=1)
    b.op("Sub", [d_y, b.op("Mul", [b.op("Exp", [y]), total])], node.output[0])


def lower_softmax_grad(node, b: _Builder) -> None:
    """Opset < 13 Softmax's gradient: the softmax ran over Flatten(x, axis)'s rows."""
    _flattened(node, b, lower_softmax_grad_13)


def lower_log_softmax_grad(node, b: _Builder) -> None:
    _flattened(node, b, lower_log_softmax_grad_13)


def _flattened(node, b: _Builder, lower_2d) -> None:
    d_y, y = node.input[0], node.input[1]
    axis = _attribute(node, "axis", 1)
    flat = helper.make_node(node.op_type, [b.op("Flatten", [d_y], axis=axis), b.op("Flatten", [y], axis=axis)],
                            [b.context.fresh(b.prefix + "/flat")], axis=1)
    lower_2d(flat, b)
    b.op("Reshape", [flat.output[0], b.op("Shape", [d_y])], node.output[0])


# --- layer norms ---------------------------------------------------------------------------------------


def lower_simplified_layer_norm_grad(node, b: _Builder) -> None:
    d_y, x, scale, inv_std = node.input[:4]
    _layer_norm_grad(node, b, d_y, x, scale, None, inv_std)


def lower_layer_norm_grad(node, b: _Builder) -> None:
    d_y, x, scale, mean, inv_std = node.input[:5]
    _layer_norm_grad(node, b, d_y, x, scale, mean, inv_std)


def _layer_norm_grad(node, b: _Builder, d_y, x, scale, mean, inv_std) -> None:
    axes = _normalized_axes(node, b, x, scale)
    centred = x if mean is None else b.op("Sub", [x, mean])
    x_hat = b.op("Mul", [centred, inv_std])
    scaled = b.op("Mul", [b.op("Mul", [d_y, scale]), inv_std])
    projection = b.op("Mul", [x_hat, b.reduce("ReduceMean", b.op("Mul", [scaled, x_hat]), axes, keepdims=1)])
    if _output(node, 0):
        if mean is not None:
            scaled = b.op("Sub", [scaled, b.reduce("ReduceMean", scaled, axes, keepdims=1)])
        b.op("Sub", [scaled, projection], node.output[0])
    if _output(node, 1):
        _sum_leading(b, b.op("Mul", [d_y, x_hat]), scale, node.output[1])
    if mean is not None and _output(node, 2):
        _sum_leading(b, d_y, scale, node.output[2])


def _normalized_axes(node, b: _Builder, x: str, scale: str) -> list[int]:
    """The axes a layer norm normalizes (from `axis` to the last) as negative numbers."""
    scale_shape = b.context.shape(scale)
    if scale_shape is not None:
        return list(range(-len(scale_shape), 0))
    axis = _attribute(node, "axis", -1)
    if axis < 0:
        return list(range(axis, 0))
    x_shape = b.context.shape(x)
    if x_shape is None:
        raise RuntimeError(f"{node.op_type} {node.name}: the rank of {x} is unknown")
    return list(range(axis - len(x_shape), 0))


def _sum_leading(b: _Builder, value: str, like: str, out: str) -> str:
    """Sum `value` over the axes before the trailing shape of `like`, giving `like`'s shape."""
    rows = b.op("Reshape", [value, b.op("Concat", [b.ints([-1]), b.op("Shape", [like])], axis=0)])
    return b.reduce("ReduceSum", rows, [0], keepdims=0, out=out)


# --- activations ---------------------------------------------------------------------------------------


def lower_quick_gelu_grad(node, b: _Builder) -> None:
    d_y, x = node.input[0], node.input[1]
    alpha = float(_attribute(node, "alpha", 1.702))
    scaled = b.op("Mul", [x, b.scalar(alpha, x)]) if alpha != 1.0 else x
    sigmoid = b.op("Sigmoid", [scaled])
    one = b.scalar(1.0, x)
    slope = b.op("Add", [one, b.op("Mul", [scaled, b.op("Sub", [one, sigmoid])])])
    b.op("Mul", [d_y, b.op("Mul", [sigmoid, slope])], node.output[0])


def lower_gelu_grad(node, b: _Builder) -> None:
    _gelu_grad(node, b, node.input[1])


def lower_bias_gelu_grad(node, b: _Builder) -> None:
    _gelu_grad(node, b, b.op("Add", [node.input[1], node.input[2]]))


def _gelu_grad(node, b: _Builder, x: str) -> None:
    """dY * (Phi(x) + x phi(x)): 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)."""
    d_y = node.input[0]
    erf = b.op("Erf", [b.op("Mul", [x, b.scalar(math.sqrt(0.5), x)])])
    cdf = b.op("Mul", [b.scalar(0.5, x), b.op("Add", [b.scalar(1.0, x), erf])])
    density = b.op("Exp", [b.op("Mul", [b.op("Mul", [x, x]), b.scalar(-0.5, x)])])
    slope = b.op("Add", [cdf, b.op("Mul", [b.op("Mul", [x, b.scalar(1.0 / math.sqrt(2.0 * math.pi), x)]), density])])
    b.op("Mul", [d_y, slope], node.output[0])


def lower_fast_gelu_grad(node, b: _Builder) -> None:
    _fast_gelu_grad(node, b, node.input[1])


def lower_bias_fast_gelu_grad(node, b: _Builder) -> None:
    _fast_gelu_grad(node, b, b.op("Add", [node.input[1], node.input[2]]))


def _fast_gelu_grad(node, b: _Builder, x: str) -> None:
    """dY * 0.5 (1 + t + (1 - t^2)(a x + 3 g a x^3)), t = tanh(a x + g a x^3), a = sqrt(2 / pi), g = 0.044715."""
    alpha, gamma = math.sqrt(2.0 / math.pi), 0.044715
    cube = b.op("Mul", [b.op("Mul", [x, x]), x])
    linear = b.op("Mul", [x, b.scalar(alpha, x)])
    tanh = b.op("Tanh", [b.op("Add", [linear, b.op("Mul", [cube, b.scalar(alpha * gamma, x)])])])
    one = b.scalar(1.0, x)
    sech2 = b.op("Sub", [one, b.op("Mul", [tanh, tanh])])
    inner = b.op("Add", [linear, b.op("Mul", [cube, b.scalar(3.0 * alpha * gamma, x)])])
    total = b.op("Add", [b.op("Add", [tanh, b.op("Mul", [sech2, inner])]), one])
    b.op("Mul", [node.input[0], b.op("Mul", [total, b.scalar(0.5, x)])], node.output[0])


def lower_sigmoid_grad(node, b: _Builder) -> None:
    d_y, y = node.input[0], node.input[1]
    slope = b.op("Mul", [y, b.op("Sub", [b.scalar(1.0, y), y])])
    b.op("Mul", [d_y, slope], node.output[0])


def lower_tanh_grad(node, b: _Builder) -> None:
    d_y, y = node.input[0], node.input[1]
    b.op("Mul", [d_y, b.op("Sub", [b.scalar(1.0, y), b.op("Mul", [y, y])])], node.output[0])


def lower_leaky_relu_grad(node, b: _Builder) -> None:
    d_y, y = node.input[0], node.input[1]
    alpha = float(_attribute(node, "alpha", 0.01))
    leaked = b.op("Mul", [d_y, b.scalar(alpha, d_y)])
    b.op("Where", [b.op("Greater", [y, b.scalar(0.0, y)]), d_y, leaked], node.output[0])


def lower_relu_grad(node, b: _Builder) -> None:
    d_y, x = node.input[0], node.input[1]
    b.op("Where", [b.op("Greater", [x, b.scalar(0.0, x)]), d_y, b.scalar(0.0, d_y)], node.output[0])


# --- arithmetic ----------------------------------------------------------------------------------------


def lower_div_grad(node, b: _Builder) -> None:
    d_y, a, divisor = node.input[0], node.input[1], node.input[2]
    if _output(node, 0):
        b.reduce_to_shape(b.op("Div", [d_y, divisor]), a, node.output[0])
    if _output(node, 1):
        quotient = b.op("Div", [b.op("Mul", [d_y, a]), b.op("Mul", [divisor, divisor])])
        b.reduce_to_shape(b.op("Neg", [quotient]), divisor, node.output[1])


def lower_scale(node, b: _Builder) -> None:
    x, scale = node.input[0], node.input[1]
    if b.context.elem_type(scale, TensorProto.UNDEFINED) != b.context.elem_type(x):
        scale = b.op("Cast", [scale], to=b.context.elem_type(x))
    b.op("Div" if _attribute(node, "scale_down", 0) else "Mul", [x, scale], node.output[0])


def lower_reduce_sum_training(node, b: _Builder) -> None:
    _require_opset(b, 13, "ReduceSum's axes as an input")
    attributes = {name: _attribute(node, name) for name in ("keepdims", "noop_with_empty_axes")
                  if _attribute(node, name) is not None}
    inputs = [node.input[0]] + ([b.as_int64(node.input[1])] if _input(node, 1) else [])
    b.op("ReduceSum", inputs, node.output[0], **attributes)


def lower_dropout_grad(node, b: _Builder) -> None:
    d_y, mask = node.input[0], node.input[1]
    ratio, training = _input(node, 2), _input(node, 3)
    training_value = b.context.constant(training) if training else np.array(False)
    if training_value is not None and not bool(np.asarray(training_value)):
        b.op("Identity", [d_y], node.output[0])
        return
    ratio = ratio or b.scalar(0.5, d_y)
    if b.context.elem_type(ratio, TensorProto.UNDEFINED) != b.context.elem_type(d_y):
        ratio = b.op("Cast", [ratio], to=b.context.elem_type(d_y))
    keep = b.op("Sub", [b.scalar(1.0, d_y), ratio])
    kept = b.op("Mul", [d_y, b.op("Cast", [mask], to=b.context.elem_type(d_y))])
    if training_value is not None:
        b.op("Div", [kept, keep], node.output[0])
        return
    b.op("Where", [training, b.op("Div", [kept, keep]), d_y], node.output[0])


# --- cross-entropy -------------------------------------------------------------------------------------


def lower_softmax_cross_entropy_loss_grad(node, b: _Builder) -> None:
    d_y, log_prob, label = node.input[0], node.input[1], b.as_int64(node.input[2])
    weight, ignore = _input(node, 3), _input(node, 4)
    if ignore is None and _attribute(node, "ignore_index") is not None:
        ignore = b.ints(int(_attribute(node, "ignore_index")))
    elif ignore is not None:
        ignore = b.as_int64(ignore)
    reduction = _attribute(node, "reduction", "mean")
    zero = b.ints(0)
    valid = b.op("Not", [b.op("Equal", [label, ignore])]) if ignore else None
    safe_label = b.op("Where", [valid, label, zero]) if valid else label
    depth = b.op("Gather", [b.op("Shape", [log_prob]), b.ints([1])], axis=0)
    values = b.context.constant_tensor(np.array([0, 1]), b.context.elem_type(log_prob))
    one_hot = b.op("OneHot", [safe_label, depth, values], axis=1)
    difference = b.op("Sub", [b.op("Exp", [log_prob]), one_hot])
    weights = b.op("Gather", [weight, safe_label], axis=0) if weight else None
    if valid:
        mask = b.op("Cast", [valid], to=b.context.elem_type(log_prob))
        weights = b.op("Mul", [weights, mask]) if weights else mask
    factor = d_y
    if reduction == "mean":
        if weights:
            total = b.reduce("ReduceSum", weights, None, keepdims=0)
        else:
            total = b.op("Cast", [b.op("Size", [label])], to=b.context.elem_type(log_prob))
        is_zero = b.op("Equal", [total, b.scalar(0.0, log_prob)])
        factor = b.op("Div", [d_y, b.op("Where", [is_zero, b.scalar(1.0, log_prob), total])])
    if weights:
        factor = b.op("Mul", [weights, factor])
    elif reduction != "none":
        factor = b.op("Expand", [factor, b.op("Shape", [label])])
    b.op("Mul", [difference, b.op("Unsqueeze", [factor, b.ints([1])])], node.output[0])


def lower_softmax_cross_entropy_loss_internal(node, b: _Builder) -> None:
    logits, label = node.input[0], node.input[1]
    weight, ignore = _input(node, 2), _input(node, 3)
    attributes = {"reduction": _attribute(node, "reduction", "mean")}
    if ignore:
        value = b.context.constant(ignore)
        if value is None:
            raise RuntimeError(f"{node.op_type} {node.name}: ignore_index {ignore} is not a constant")
        attributes["ignore_index"] = int(np.asarray(value))
    inputs = [logits, label] + ([weight] if weight else [])
    b.multi("SoftmaxCrossEntropyLoss", inputs, [name for name in node.output], **attributes)


LOWERINGS = {
    (MS_DOMAIN, "ConcatTraining"): lower_concat_training,
    (MS_DOMAIN, "SplitTraining"): lower_split_training,
    (MS_DOMAIN, "SliceGrad"): lower_slice_grad,
    (MS_DOMAIN, "GatherGrad"): lower_gather_grad,
    (MS_DOMAIN, "GatherElementsGrad"): lower_gather_elements_grad,
    (MS_DOMAIN, "GatherNDGrad"): lower_gather_nd_grad,
    (MS_DOMAIN, "BroadcastGradientArgs"): lower_broadcast_gradient_args,
    (MS_DOMAIN, "SoftmaxGrad_13"): lower_softmax_grad_13,
    (MS_DOMAIN, "SoftmaxGrad"): lower_softmax_grad,
    (MS_DOMAIN, "LogSoftmaxGrad_13"): lower_log_softmax_grad_13,
    (MS_DOMAIN, "LogSoftmaxGrad"): lower_log_softmax_grad,
    (MS_DOMAIN, "SimplifiedLayerNormalizationGrad"): lower_simplified_layer_norm_grad,
    (MS_DOMAIN, "LayerNormalizationGrad"): lower_layer_norm_grad,
    (MS_DOMAIN, "QuickGeluGrad"): lower_quick_gelu_grad,
    (MS_DOMAIN, "GeluGrad"): lower_gelu_grad,
    (MS_DOMAIN, "BiasGeluGrad_dX"): lower_bias_gelu_grad,
    (MS_DOMAIN, "FastGeluGrad"): lower_fast_gelu_grad,
    (MS_DOMAIN, "BiasFastGeluGrad_dX"): lower_bias_fast_gelu_grad,
    (MS_DOMAIN, "SigmoidGrad"): lower_sigmoid_grad,
    (MS_DOMAIN, "TanhGrad"): lower_tanh_grad,
    (MS_DOMAIN, "ReluGrad"): lower_relu_grad,
    (MS_DOMAIN, "LeakyReluGrad"): lower_leaky_relu_grad,
    (MS_DOMAIN, "DivGrad"): lower_div_grad,
    (MS_DOMAIN, "Scale"): lower_scale,
    (MS_DOMAIN, "ReduceSumTraining"): lower_reduce_sum_training,
    (MS_DOMAIN, "DropoutGrad"): lower_dropout_grad,
    (MS_DOMAIN, "SoftmaxCrossEntropyLossGrad"): lower_softmax_cross_entropy_loss_grad,
    (MS_DOMAIN, "SoftmaxCrossEntropyLossInternalGrad"): lower_softmax_cross_entropy_loss_grad,
    (MS_DOMAIN, "SoftmaxCrossEntropyLossInternal"): lower_softmax_cross_entropy_loss_internal,
}
