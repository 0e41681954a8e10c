"""LowerTrainingOps: every training-only op of ORT's gradient graphs becomes standard ONNX with the same numbers.

The reference is the training build's own kernels (onnxruntime-training-cpu 1.19.2, run in the gradient
builder's venv: reference_runtime.py); the lowered graphs run with this process's onnxruntime (stock).
Per-op tests use tiny one-node graphs with symbolic shapes, duplicate and negative indices and clamped
slice bounds, checked against the kernel and against numpy; bundle tests prepare tiny bundles of every
supported architecture and option and compare the loss and every gradient of the whole training graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.lower_training_ops import (
    STOCK_CONTRIB_OPS,
    LowerTrainingOps,
    training_only_ops,
)

from helpers.reference_runtime import (
    build_training_graph,
    EXACT_CONFIG,
    ReferenceError,
    run_local,
    run_reference,
    run_reference_many,
)

MS = "com.microsoft"
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
REL = 1e-5


# --- helpers -------------------------------------------------------------------------------------------


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-12))


def assert_close(actual, expected, what: str, rel: float = REL) -> float:
    error = relative_error(actual, expected)
    assert error <= rel, f"{what}: relative L2 error {error:.2e}"
    return error


def one_node_model(op_type: str, inputs: list, outputs: dict, opset: int = 17, domain: str = MS, **attributes):
    """A graph of one node. `inputs`: (name, value, how) with how "input" (graph input, symbolic dims),
    "const" (initializer) or None (an absent optional input); `outputs`: name -> element type."""
    graph_inputs, initializers, names = [], [], []
    for name, value, how in inputs:
        names.append(name if how else "")
        if how == "input":
            value = np.asarray(value)
            dims = [f"{name}_{axis}" for axis in range(value.ndim)]
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), dims))
        elif how == "const":
            initializers.append(numpy_helper.from_array(np.asarray(value), name))
    while names and not names[-1]:
        names.pop()
    node = helper.make_node(op_type, names, list(outputs), domain=domain, **attributes)
    graph = helper.make_graph([node], op_type, graph_inputs,
                              [helper.make_tensor_value_info(name, kind, None) for name, kind in outputs.items()], initializers)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def feeds_of(inputs: list) -> dict:
    return {name: np.asarray(value) for name, value, how in inputs if how == "input"}


def lowered_copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = LowerTrainingOps().call(copy)
    assert result.modified and result.count >= 1
    assert not training_only_ops(copy)
    read = {name for node in copy.graph.node for name in node.input}
    assert [t.name for t in copy.graph.initializer if t.name not in read] == []  # e.g. SliceGrad's steps: gone
    return copy


def _rng(seed: int = 0):
    return np.random.default_rng(seed)


def _normal(shape, seed: int = 0) -> np.ndarray:
    return _rng(seed).standard_normal(shape).astype(np.float32)


# --- per-op cases: each builder returns (model, feeds, numpy_expected or None, kernel_expected_to_fail) ---------


def _slice_grad(x_shape, starts, ends, axes=None, steps=None, dynamic_bounds=False, index_type=np.int64, opset=17):
    count = len(starts)
    slices = [slice(None)] * len(x_shape)
    for axis, start, end, step in zip(axes if axes is not None else range(count), starts, ends, steps or [1] * count):
        slices[axis] = slice(start, end, step)
    d_y = _normal(np.zeros(x_shape)[tuple(slices)].shape, seed=len(x_shape) + count)
    expected = np.zeros(x_shape, np.float32)
    expected[tuple(slices)] = d_y
    bounds = "input" if dynamic_bounds else "const"
    inputs = [("dY", d_y, "input"), ("shape", np.array(x_shape, np.int64), "input"),
              ("starts", np.array(starts, index_type), bounds), ("ends", np.array(ends, index_type), bounds),
              ("axes", None if axes is None else np.array(axes, index_type), "const" if axes is not None else None),
              ("steps", None if steps is None else np.array(steps, index_type), "const" if steps is not None else None)]
    model = one_node_model("SliceGrad", inputs, {"dX": FLOAT}, opset=opset)
    return model, feeds_of(inputs), {"dX": expected}


def _gather_grad(data_shape, indices, axis, index_type=np.int64, opset=17):
    indices = np.asarray(indices, index_type)
    d_y_shape = tuple(data_shape[:axis % len(data_shape)]) + indices.shape + tuple(data_shape[axis % len(data_shape) + 1:])
    d_y = _normal(d_y_shape, seed=3)
    expected = np.zeros(data_shape, np.float32)
    lead = (slice(None),) * (axis % len(data_shape))
    for position in np.ndindex(indices.shape):
        expected[lead + (int(indices[position]),)] += d_y[lead + position]
    inputs = [("shape", np.array(data_shape, np.int64), "input"), ("indices", indices, "input"), ("dY", d_y, "input")]
    return one_node_model("GatherGrad", inputs, {"dX": FLOAT}, opset=opset, axis=axis), feeds_of(inputs), {"dX": expected}


def _gather_elements_grad(data_shape, indices, axis):
    indices = np.asarray(indices, np.int64)
    d_y = _normal(indices.shape, seed=4)
    expected = np.zeros(data_shape, np.float32)
    for position in np.ndindex(indices.shape):
        target = list(position)
        target[axis] = int(indices[position])
        expected[tuple(target)] += d_y[position]
    inputs = [("dY", d_y, "input"), ("shape", np.array(data_shape, np.int64), "input"), ("indices", indices, "input")]
    model = one_node_model("GatherElementsGrad", inputs, {"dX": FLOAT}, axis=axis)
    return model, feeds_of(inputs), {"dX": expected}


def _gather_nd_grad(data_shape, indices):
    indices = np.asarray(indices, np.int64)
    depth = indices.shape[-1]
    d_y = _normal(indices.shape[:-1] + tuple(data_shape[depth:]), seed=29)
    expected = np.zeros(data_shape, np.float32)
    for position in np.ndindex(indices.shape[:-1]):
        expected[tuple(int(i) for i in indices[position])] += d_y[position]
    inputs = [("shape", np.array(data_shape, np.int64), "input"), ("indices", indices, "input"), ("dY", d_y, "input")]
    return one_node_model("GatherNDGrad", inputs, {"dX": FLOAT}), feeds_of(inputs), {"dX": expected}


def _broadcast_gradient_args(a_shape, b_shape):
    """The kernel's own loop in numpy: axes of the broadcast result, descending."""
    rank = max(len(a_shape), len(b_shape))
    a_axes, b_axes = [], []
    for k in range(rank - 1, -1, -1):
        i, j = k - (rank - len(a_shape)), k - (rank - len(b_shape))
        if i < 0:
            a_axes.append(k)
        elif j < 0:
            b_axes.append(k)
        elif a_shape[i] != b_shape[j]:
            (a_axes if a_shape[i] == 1 else b_axes).append(k)
    inputs = [("a_shape", np.array(a_shape, np.int64), "input"), ("b_shape", np.array(b_shape, np.int64), "input")]
    model = one_node_model("BroadcastGradientArgs", inputs, {"a_axes": INT64, "b_axes": INT64})
    return model, feeds_of(inputs), {"a_axes": np.array(a_axes, np.int64), "b_axes": np.array(b_axes, np.int64)}


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _softmax_grad(op_type, shape, axis, log=False):
    x, d_y = _normal(shape, 5), _normal(shape, 6)
    flat_axis = axis if op_type.endswith("_13") else None
    if flat_axis is None:  # opset < 13 semantics: softmax over the flattened trailing axes
        rows = int(np.prod(shape[:axis]))
        y = _softmax(x.reshape(rows, -1), 1).reshape(shape)
        dy2, y2 = d_y.reshape(rows, -1), y.reshape(rows, -1)
    else:
        y = _softmax(x, axis)
        dy2, y2 = np.moveaxis(d_y, axis, -1), np.moveaxis(y, axis, -1)
    if log:
        y = np.log(y)
        y2 = np.log(y2)
        expected2 = dy2 - np.exp(y2) * dy2.sum(-1, keepdims=True)
    else:
        expected2 = y2 * (dy2 - (dy2 * y2).sum(-1, keepdims=True))
    expected = expected2.reshape(shape) if flat_axis is None else np.moveaxis(expected2, -1, axis)
    inputs = [("dY", d_y, "input"), ("Y", y.astype(np.float32), "input")]
    return one_node_model(op_type, inputs, {"dX": FLOAT}, axis=axis), feeds_of(inputs), {"dX": expected}


def _layer_norm_grad(simplified: bool, opset=17):
    x, d_y = _normal((2, 3, 8), 7), _normal((2, 3, 8), 8)
    scale = _normal((8,), 9) + 1.0
    mean = np.zeros((2, 3, 1), np.float32) if simplified else x.mean(-1, keepdims=True)
    centred = x - mean
    inv_std = (1.0 / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5)).astype(np.float32)
    x_hat = centred * inv_std
    b = d_y * scale * inv_std
    d_x = b - x_hat * (b * x_hat).mean(-1, keepdims=True) - (0 if simplified else b.mean(-1, keepdims=True))
    expected = {"dX": d_x, "dScale": (d_y * x_hat).sum((0, 1))}
    inputs = [("dY", d_y, "input"), ("X", x, "input"), ("scale", scale, "const")]
    if not simplified:
        inputs.append(("mean", mean.astype(np.float32), "input"))
        expected["dBias"] = d_y.sum((0, 1))
    inputs.append(("inv_std", inv_std, "input"))
    op_type = "SimplifiedLayerNormalizationGrad" if simplified else "LayerNormalizationGrad"
    model = one_node_model(op_type, inputs, {name: FLOAT for name in expected}, opset=opset, axis=-1, epsilon=1e-5)
    return model, feeds_of(inputs), expected


def _activation_grad(op_type, numpy_slope, uses_output=False, bias=False, **attributes):
    x, d_y = _normal((3, 5), 10) * 2, _normal((3, 5), 11)
    inputs = [("dY", d_y, "input")]
    if bias:
        b = _normal((5,), 12)
        inputs += [("X", x, "input"), ("B", b, "input")]
        x = x + b
    else:
        inputs.append(("Y" if uses_output else "X", numpy_slope.forward(x) if uses_output else x, "input"))
    expected = {"dX": d_y * numpy_slope(x)}
    return one_node_model(op_type, inputs, {"dX": FLOAT}, **attributes), feeds_of(inputs), expected


class _Slope:
    """d activation / dx as a function of x (and the forward, for grads that read the output)."""

    def __init__(self, slope, forward=None):
        self.slope, self.forward = slope, forward

    def __call__(self, x):
        return self.slope(x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _erf(x):
    from math import erf

    return np.vectorize(erf)(x)


GELU = _Slope(lambda x: 0.5 * (1 + _erf(x / np.sqrt(2))) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi))
FAST_GELU = _Slope(lambda x: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
                   + 0.5 * x * (1 - np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)) ** 2)
                   * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x ** 2))


def _quick_gelu(alpha):
    return _Slope(lambda x: _sigmoid(alpha * x) * (1 + alpha * x * (1 - _sigmoid(alpha * x))))


def _div_grad(a_shape, b_shape):
    a, b = _normal(a_shape, 13), np.abs(_normal(b_shape, 14)) + 0.5
    d_y = _normal(np.broadcast_shapes(a_shape, b_shape), 15)

    def reduce_to(g, shape):
        while g.ndim > len(shape):
            g = g.sum(0)
        return g.sum(tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True).reshape(shape)

    expected = {"dA": reduce_to(d_y / b, a_shape), "dB": reduce_to(-d_y * a / (b * b), b_shape)}
    inputs = [("dY", d_y, "input"), ("A", a, "input"), ("B", b, "input")]
    return one_node_model("DivGrad", inputs, {"dA": FLOAT, "dB": FLOAT}), feeds_of(inputs), expected


def _dropout_grad(ratio, training):
    d_y = _normal((4, 6), 16)
    mask = _rng(17).random((4, 6)) > 0.3
    inputs = [("dY", d_y, "input"), ("mask", mask, "input")]
    inputs.append(("ratio", np.array(ratio, np.float32), "const") if ratio is not None else ("ratio", None, None))
    if training is not None:
        inputs.append(("training_mode", np.array(training), "const"))
    scale = 1.0 / (1.0 - (0.5 if ratio is None else ratio))
    expected = d_y * mask * scale if training else d_y
    return one_node_model("DropoutGrad", inputs, {"dX": FLOAT}), feeds_of(inputs), {"dX": expected}


def _cross_entropy_grad(op_type, logits_shape, reduction, weighted=False, all_ignored=False, ignore_as_input=False):
    logits = _normal(logits_shape, 18)
    classes = logits_shape[1]
    label_shape = (logits_shape[0],) + tuple(logits_shape[2:])
    labels = _rng(19).integers(0, classes, size=label_shape).astype(np.int64)
    labels.reshape(-1)[::3] = -100
    if all_ignored:
        labels[...] = -100
    log_prob = np.log(_softmax(logits, 1)).astype(np.float32)
    d_y = _normal(label_shape, 20) if reduction == "none" else np.array(0.75, np.float32)
    weight = np.abs(_normal((classes,), 21)) + 0.1
    valid = labels != -100
    safe = np.where(valid, labels, 0)
    w = (weight[safe] if weighted else np.ones(label_shape, np.float32)) * valid
    factor = w * d_y
    if reduction == "mean" and w.sum() != 0:
        factor = w * (d_y / w.sum())
    one_hot = np.moveaxis(np.eye(classes, dtype=np.float32)[safe], -1, 1)
    expected = (np.exp(log_prob) - one_hot) * np.expand_dims(factor, 1)
    inputs = [("dY", d_y, "input"), ("log_prob", log_prob, "input"), ("label", labels, "input"),
              ("weight", weight, "input") if weighted else ("weight", None, None)]
    attributes = {"reduction": reduction}
    if ignore_as_input:
        inputs.append(("ignore_index", np.array(-100, np.int64), "input"))
    else:
        attributes["ignore_index"] = -100
    return one_node_model(op_type, inputs, {"dX": FLOAT}, **attributes), feeds_of(inputs), {"dX": expected}


def _cross_entropy_internal():
    logits = _normal((5, 4), 22)
    labels = np.array([1, -100, 3, 0, -100], np.int64)
    inputs = [("logits", logits, "input"), ("label", labels, "input"), ("weight", None, None),
              ("ignore_index", np.array(-100, np.int64), "const")]
    log_prob = np.log(_softmax(logits, 1))
    valid = labels != -100
    loss = -log_prob[np.arange(5), np.where(valid, labels, 0)][valid].mean()
    model = one_node_model("SoftmaxCrossEntropyLossInternal", inputs, {"loss": FLOAT, "log_prob": FLOAT}, reduction="mean")
    return model, feeds_of(inputs), {"loss": np.array(loss, np.float32), "log_prob": log_prob}


def _concat_split(dynamic: bool, opset=17):
    """ConcatTraining's lengths feeding SplitTraining (the shared LoRA input's A stack and its gradient)."""
    parts = [_normal((2, 5), 23), _normal((3, 5), 24), _normal((1, 5), 25)]
    how = "input" if dynamic else "const"
    inputs = [(f"x{index}", part, how) for index, part in enumerate(parts)]
    concat = helper.make_node("ConcatTraining", [name for name, _, _ in inputs], ["stacked", "lengths"], domain=MS, axis=0)
    scaled = helper.make_node("Mul", ["stacked", "two"], ["stacked_grad"])
    split = helper.make_node("SplitTraining", ["stacked_grad", "lengths"], ["g0", "g1", "g2"], domain=MS, axis=0)
    graph_inputs = [helper.make_tensor_value_info(name, FLOAT, [f"{name}_rows", 5]) for name, _, h in inputs if h == "input"]
    initializers = [numpy_helper.from_array(part, name) for name, part, h in inputs if h == "const"]
    initializers.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    outputs = [helper.make_tensor_value_info(name, kind, None) for name, kind in
               (("stacked", FLOAT), ("lengths", INT64), ("g0", FLOAT), ("g1", FLOAT), ("g2", FLOAT))]
    graph = helper.make_graph([concat, scaled, split], "concat_split", graph_inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)], ir_version=8)
    expected = {"stacked": np.concatenate(parts), "lengths": np.array([2, 3, 1]),
                **{f"g{index}": 2 * part for index, part in enumerate(parts)}}
    return model, feeds_of(inputs), expected


def _split_training(opset):
    x = _normal((6, 4), 26)
    inputs = [("x", x, "input"), ("split", np.array([1, 2, 3], np.int64), "input")]
    model = one_node_model("SplitTraining", inputs, {"a": FLOAT, "b": FLOAT, "c": FLOAT}, opset=opset, axis=0)
    return model, feeds_of(inputs), {"a": x[:1], "b": x[1:3], "c": x[3:]}


def _reduce_sum_training(keepdims, noop, axes):
    x = _normal((2, 3, 4), 27)
    inputs = [("x", x, "input"), ("axes", np.array(axes, np.int64), "input")]
    expected = x if (noop and not axes) else x.sum(tuple(axes) if axes else None, keepdims=bool(keepdims))
    model = one_node_model("ReduceSumTraining", inputs, {"y": FLOAT}, keepdims=keepdims, noop_with_empty_axes=noop)
    return model, feeds_of(inputs), {"y": np.asarray(expected, np.float32)}


def _scale(scale_down, scale_value):
    x = _normal((3, 4), 28)
    inputs = [("x", x, "input"), ("scale", scale_value, "input")]
    expected = x / np.float32(scale_value) if scale_down else x * np.float32(scale_value)
    return one_node_model("Scale", inputs, {"y": FLOAT}, scale_down=scale_down), feeds_of(inputs), {"y": expected}


OP_CASES = {
    # SliceGrad: unit steps -> Pad; others -> scatter. Shapes are symbolic; bounds as ONNX Slice clamps them.
    "SliceGrad-negative-start-clamped-end": lambda: _slice_grad((4, 6, 5), [-3, 1], [INT64_MAX, 100], axes=[1, -1], steps=[1, 1]),
    "SliceGrad-no-axes-no-steps": lambda: _slice_grad((5, 4), [1, 0], [-1, 3]),
    "SliceGrad-dynamic-bounds": lambda: _slice_grad((7, 3), [2], [5], axes=[0], dynamic_bounds=True),
    "SliceGrad-int32-bounds": lambda: _slice_grad((6, 4), [-4], [-1], axes=[0], steps=[1], index_type=np.int32),
    "SliceGrad-empty-slice": lambda: _slice_grad((5, 3), [4], [2], axes=[0], steps=[1]),
    "SliceGrad-rotary-reversal": lambda: _slice_grad((6, 2, 8), [-1], [INT64_MIN + 1], axes=[1], steps=[-1]),
    "SliceGrad-reversed-partial": lambda: _slice_grad((9, 3), [100], [-6], axes=[0], steps=[-1], dynamic_bounds=True),
    "SliceGrad-mixed-steps": lambda: _slice_grad((6, 5, 4), [4, 1], [0, 5], axes=[-1, 1], steps=[-1, 1]),
    "SliceGrad-step-2": lambda: _slice_grad((9, 4), [-8], [INT64_MAX], axes=[0], steps=[2]),
    "SliceGrad-step-minus-2": lambda: _slice_grad((3, 9), [-1], [INT64_MIN], axes=[1], steps=[-2]),
    "SliceGrad-step-minus-3-dynamic": lambda: _slice_grad((10, 3), [7], [-100], axes=[0], steps=[-3], dynamic_bounds=True),
    "SliceGrad-opset21": lambda: _slice_grad((4, 2, 6), [-1, 2], [INT64_MIN + 1, 6], axes=[1, 2], steps=[-1, 1], opset=21),
    # GatherGrad / GatherElementsGrad: duplicates add up, negative indices count from the end.
    "GatherGrad-axis0-duplicates-negative": lambda: _gather_grad((7, 4), [[1, -1, 1], [6, 0, -7]], 0),
    "GatherGrad-axis1-duplicates-negative": lambda: _gather_grad((3, 5, 2), [4, -1, 0, 4, -5], 1),
    "GatherGrad-axis-minus1": lambda: _gather_grad((3, 4), [[0, -1], [3, 3]], -1),
    "GatherGrad-scalar-index-axis1": lambda: _gather_grad((2, 6, 4), np.array(0), 1),
    "GatherGrad-int32-opset21": lambda: _gather_grad((5, 3), [-1, 2, 2, 0], 0, index_type=np.int32, opset=21),
    "GatherElementsGrad-axis1": lambda: _gather_elements_grad((4, 6), [[5], [-1], [0], [-6]], 1),
    "GatherElementsGrad-axis0-duplicates": lambda: _gather_elements_grad((3, 4), [[0, 2, -1, 1], [0, -3, 2, 1]], 0),
    "GatherElementsGrad-axis-minus1": lambda: _gather_elements_grad((2, 3, 4), np.array([[[3, -1]] * 3] * 2), -1),
    "GatherNDGrad-duplicates-negative": lambda: _gather_nd_grad((4, 3, 2), [[0, 1], [-1, 2], [0, 1], [3, -2]]),
    "GatherNDGrad-full-coordinates": lambda: _gather_nd_grad((3, 4, 2), [[[0, 1, 1], [2, 3, 0]], [[0, 1, 1], [-1, -1, -1]]]),
    "BroadcastGradientArgs-trailing": lambda: _broadcast_gradient_args([2, 3, 4], [4]),
    "BroadcastGradientArgs-ones-both-ways": lambda: _broadcast_gradient_args([1, 3, 1], [5, 1, 4]),
    "BroadcastGradientArgs-shorter-first": lambda: _broadcast_gradient_args([3], [2, 1, 3]),
    "BroadcastGradientArgs-same-shape": lambda: _broadcast_gradient_args([2, 1], [2, 1]),
    # softmax family
    "SoftmaxGrad_13-last-axis": lambda: _softmax_grad("SoftmaxGrad_13", (2, 3, 5), -1),
    "SoftmaxGrad_13-axis1": lambda: _softmax_grad("SoftmaxGrad_13", (2, 4, 3), 1),
    "SoftmaxGrad-flattened": lambda: _softmax_grad("SoftmaxGrad", (2, 3, 4), 1),
    "LogSoftmaxGrad_13": lambda: _softmax_grad("LogSoftmaxGrad_13", (3, 6), -1, log=True),
    "LogSoftmaxGrad-flattened": lambda: _softmax_grad("LogSoftmaxGrad", (2, 3, 2), 1, log=True),
    # layer norms
    "SimplifiedLayerNormalizationGrad": lambda: _layer_norm_grad(True),
    "SimplifiedLayerNormalizationGrad-opset21": lambda: _layer_norm_grad(True, opset=21),
    "LayerNormalizationGrad": lambda: _layer_norm_grad(False),
    # activations
    "QuickGeluGrad-alpha1": lambda: _activation_grad("QuickGeluGrad", _quick_gelu(1.0), alpha=1.0),
    "QuickGeluGrad-alpha1.702": lambda: _activation_grad("QuickGeluGrad", _quick_gelu(1.702), alpha=1.702),
    "GeluGrad": lambda: _activation_grad("GeluGrad", GELU),
    "FastGeluGrad": lambda: _activation_grad("FastGeluGrad", FAST_GELU),
    "BiasGeluGrad_dX": lambda: _activation_grad("BiasGeluGrad_dX", GELU, bias=True),
    "BiasFastGeluGrad_dX": lambda: _activation_grad("BiasFastGeluGrad_dX", FAST_GELU, bias=True),
    "SigmoidGrad": lambda: _activation_grad("SigmoidGrad", _Slope(lambda x: _sigmoid(x) * (1 - _sigmoid(x)), _sigmoid),
                                            uses_output=True),
    "TanhGrad": lambda: _activation_grad("TanhGrad", _Slope(lambda x: 1 - np.tanh(x) ** 2, np.tanh), uses_output=True),
    "ReluGrad": lambda: _activation_grad("ReluGrad", _Slope(lambda x: (x > 0).astype(np.float32))),
    "LeakyReluGrad": lambda: _activation_grad("LeakyReluGrad", _Slope(lambda x: np.where(x > 0, 1.0, 0.1),
                                                                      lambda x: np.where(x > 0, x, 0.1 * x).astype(np.float32)),
                                              uses_output=True, alpha=0.1),
    # arithmetic and reductions
    "DivGrad-same-shape": lambda: _div_grad((3, 4), (3, 4)),
    "DivGrad-broadcast": lambda: _div_grad((2, 1, 4), (3, 1)),
    "ReduceSumTraining-keepdims": lambda: _reduce_sum_training(1, 0, [0, -1]),
    "ReduceSumTraining-dropdims": lambda: _reduce_sum_training(0, 0, [1]),
    "ReduceSumTraining-noop": lambda: _reduce_sum_training(1, 1, []),
    "Scale-multiply-int64": lambda: _scale(0, np.array(3, np.int64)),
    "Scale-divide-float": lambda: _scale(1, np.array(4.0, np.float32)),
    # dropout and cross-entropy
    "DropoutGrad-training": lambda: _dropout_grad(0.25, True),
    "DropoutGrad-default-ratio": lambda: _dropout_grad(None, True),
    "SoftmaxCrossEntropyLossGrad-mean": lambda: _cross_entropy_grad("SoftmaxCrossEntropyLossGrad", (6, 5), "mean"),
    "SoftmaxCrossEntropyLossGrad-sum-weighted": lambda: _cross_entropy_grad("SoftmaxCrossEntropyLossGrad", (6, 5), "sum",
                                                                            weighted=True),
    "SoftmaxCrossEntropyLossGrad-none-3d": lambda: _cross_entropy_grad("SoftmaxCrossEntropyLossGrad", (2, 4, 3), "none"),
    "SoftmaxCrossEntropyLossGrad-mean-weighted-3d": lambda: _cross_entropy_grad("SoftmaxCrossEntropyLossGrad", (2, 4, 3),
                                                                                "mean", weighted=True),
    "SoftmaxCrossEntropyLossGrad-all-ignored": lambda: _cross_entropy_grad("SoftmaxCrossEntropyLossGrad", (4, 3), "mean",
                                                                           all_ignored=True),
    "SoftmaxCrossEntropyLossInternalGrad": lambda: _cross_entropy_grad("SoftmaxCrossEntropyLossInternalGrad", (6, 5), "mean",
                                                                       ignore_as_input=True),
    "SoftmaxCrossEntropyLossInternal": _cross_entropy_internal,
    # concatenation and split
    "ConcatTraining-SplitTraining-dynamic": lambda: _concat_split(True),
    "ConcatTraining-SplitTraining-static": lambda: _concat_split(False),
    "ConcatTraining-SplitTraining-opset21": lambda: _concat_split(True, opset=21),
    "SplitTraining-opset17": lambda: _split_training(17),
    "SplitTraining-opset21": lambda: _split_training(21),
}
# Where the training build's kernel is not the reference (numpy is; the test asserts why).
KERNEL_FAILS = {"SliceGrad-step-minus-2", "SliceGrad-mixed-steps"}  # ORT 1.19.2: narrowing_error


@pytest.fixture(scope="module")
def op_cases():
    """Every per-op case built, and run once by the training build (one subprocess for all)."""
    built = {name: build() for name, build in OP_CASES.items()}
    names = sorted(built)
    results = run_reference_many([(built[name][0], built[name][1], list(built[name][2])) for name in names])
    return {name: (*built[name], result) for name, result in zip(names, results)}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_lowered_op_matches_training_kernel_and_numpy(op_cases, case):
    model, feeds, expected, reference = op_cases[case]
    lowered = lowered_copy(model)
    assert [entry.version for entry in lowered.opset_import if entry.domain == ""] == \
        [entry.version for entry in model.opset_import if entry.domain == ""]
    actual = run_local(lowered, feeds, list(expected))
    if case in KERNEL_FAILS:
        assert isinstance(reference, ReferenceError), "the training kernel runs this case now: compare with it"
    else:
        assert not isinstance(reference, ReferenceError), reference
        for name in expected:
            assert_close(actual[name], reference[name], f"{case} {name} vs the training kernel")
    for name, value in expected.items():
        assert_close(actual[name], value, f"{case} {name} vs numpy")


def test_dropout_grad_outside_training_mode_passes_the_gradient_through():
    """The forward Dropout dropped nothing (its mask is all true): dX = dY. (ORT 1.19.2's kernel scales by
    1 / (1 - ratio) anyway.)"""
    model, feeds, _ = _dropout_grad(0.25, False)
    feeds["mask"] = np.ones_like(feeds["mask"])
    actual = run_local(lowered_copy(model), feeds)["dX"]
    np.testing.assert_array_equal(actual, feeds["dY"])
    kernel = run_reference(model, feeds)["dX"]
    assert relative_error(kernel, feeds["dY"] / 0.75) < 1e-6


# --- graph-level contract ------------------------------------------------------------------------------


def _accumulating_graph(gradient_name: str = "W_grad"):
    """loss = ReduceSum(Softmax(x @ W)); dW through SoftmaxGrad_13; InPlaceAccumulatorV2 into a buffer."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Softmax", ["h"], ["p"], axis=-1),
        helper.make_node("ReduceSum", ["p", "axes"], ["loss"], keepdims=0),
        helper.make_node("Mul", ["p", "p"], ["dp"]),  # an arbitrary upstream gradient
        helper.make_node("SoftmaxGrad_13", ["dp", "p"], ["dh"], domain=MS, axis=-1),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
        helper.make_node("MatMul", ["xt", "dh"], [gradient_name]),
        helper.make_node("InPlaceAccumulatorV2", ["W_grad.accumulation.buffer", gradient_name, "lazy_reset_grad"],
                         ["W_grad.accumulation.out"], domain=MS),
    ]
    graph = helper.make_graph(
        nodes, "train",
        [helper.make_tensor_value_info("x", FLOAT, ["batch", 3]), helper.make_tensor_value_info("W", FLOAT, [3, 4]),
         helper.make_tensor_value_info("W_grad.accumulation.buffer", FLOAT, [3, 4]),
         helper.make_tensor_value_info("lazy_reset_grad", BOOL, [1])],
        [helper.make_tensor_value_info("loss", FLOAT, []), helper.make_tensor_value_info("W_grad.accumulation.out", BOOL, [1])],
        [numpy_helper.from_array(np.array([0, 1], np.int64), "axes")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1), helper.make_opsetid("ai.onnx.training", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8), nodes[-2].output[0]


@pytest.mark.parametrize("gradient_name", ["W_grad", "some_other_name"])
def test_accumulators_become_gradient_outputs(gradient_name):
    model, produced = _accumulating_graph(gradient_name)
    feeds = {"x": _normal((5, 3), 30), "W": _normal((3, 4), 31)}
    reference_model = onnx.ModelProto()
    reference_model.CopyFrom(model)
    reference_model.graph.output.append(helper.make_tensor_value_info(produced, FLOAT, None))
    reference = run_reference(reference_model, dict(feeds, **{"W_grad.accumulation.buffer": np.zeros((3, 4), np.float32),
                                                            "lazy_reset_grad": np.array([True])}))
    lowering = LowerTrainingOps()
    result = lowering.call(model)
    assert result.modified and lowering.lowered == {"InPlaceAccumulatorV2": 1, "SoftmaxGrad_13": 1}
    assert [value.name for value in model.graph.input] == ["x", "W"]
    assert [value.name for value in model.graph.output] == ["loss", "W_grad"]
    gradient = model.graph.output[1].type.tensor_type
    assert gradient.elem_type == FLOAT and [d.dim_value for d in gradient.shape.dim] == [3, 4]
    assert model.ir_version == 8 and {(o.domain, o.version) for o in model.opset_import} >= {("", 17)}
    actual = run_local(model, feeds)
    assert_close(actual["loss"], reference["loss"], "loss")
    assert_close(actual["W_grad"], reference[produced], "W_grad")


def test_graph_without_training_ops_is_unchanged():
    model = one_node_model("Softmax", [("x", _normal((2, 3)), "input")], {"y": FLOAT}, domain="", axis=-1)
    before = model.SerializeToString()
    lowering = LowerTrainingOps()
    result = lowering.call(model)
    assert not result.modified and result.count == 0 and lowering.lowered == {}
    assert model.SerializeToString() == before


def test_external_initializers_are_left_alone(tmp_path):
    """The pass runs on graphs loaded without their external data and never touches initializer data."""
    model, feeds, expected = _layer_norm_grad(True)
    scale = model.graph.initializer[0]
    (tmp_path / "weights.bin").write_bytes(numpy_helper.to_array(scale).tobytes())
    scale.ClearField("float_data")
    scale.ClearField("raw_data")
    scale.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(8 * 4))):
        scale.external_data.add(key=key, value=value)
    before = scale.SerializeToString()
    lowered = lowered_copy(model)
    assert next(t for t in lowered.graph.initializer if t.name == "scale").SerializeToString() == before
    onnx.save_model(lowered, str(tmp_path / "lowered.onnx"))
    actual = run_local(tmp_path / "lowered.onnx", feeds)
    for name, value in expected.items():
        assert_close(actual[name], value, name)


def test_training_only_ops_lists_what_stock_cannot_run():
    model = one_node_model("SliceGrad", [("dY", _normal((2,)), "input")], {"dX": FLOAT})
    model.graph.node.extend([helper.make_node("FusedMatMul", ["a", "b"], ["c"], domain=MS),
                             helper.make_node("Adam", ["r"], ["s"], domain="ai.onnx.preview.training"),
                             helper.make_node("Relu", ["c"], ["d"]),
                             helper.make_node("SimplifiedLayerNormalization", ["d", "w"], ["e"]),
                             helper.make_node("SinGrad", ["e", "d"], ["f"]),
                             helper.make_node("SinGrad", ["f", "d"], ["g"], domain="ai.onnx")])
    assert training_only_ops(model) == {(MS, "SliceGrad"): 1, ("ai.onnx.preview.training", "Adam"): 1, ("", "SinGrad"): 1,
                                        ("ai.onnx", "SinGrad"): 1}


def test_an_op_it_cannot_lower_raises():
    model = one_node_model("BitmaskDropoutGrad", [("dY", _normal((2, 3)), "input"), ("mask", np.zeros(1, np.uint32), "input")],
                           {"dX": FLOAT})
    with pytest.raises(RuntimeError, match="BitmaskDropoutGrad"):
        LowerTrainingOps().call(model)


def test_allowlisted_contrib_ops_have_kernels_here():
    """Every op STOCK_CONTRIB_OPS lets through has a CPU kernel in this process's onnxruntime."""
    from onnxruntime.capi import _pybind_state

    kernels = {(d.domain, d.op_name) for d in _pybind_state.get_all_opkernel_def() if d.provider == "CPUExecutionProvider"}
    missing = {(domain, op) for domain, ops in STOCK_CONTRIB_OPS.items() for op in ops} - kernels
    assert not missing


def test_training_dropout_survives_stock_dropout_elimination():
    """A training-mode Dropout whose mask nothing reads still drops after lowering (stock ORT's
    EliminateDropout would remove it), with the training build's numbers (same seed)."""
    x = np.ones((64, 32), np.float32)
    nodes = [helper.make_node("Dropout", ["x", "ratio", "training"], ["y"], seed=7),
             helper.make_node("SliceGrad", ["y", "shape", "starts", "ends"], ["z"], domain=MS)]
    graph = helper.make_graph(
        nodes, "dropout", [helper.make_tensor_value_info("x", FLOAT, ["n", 32])], [helper.make_tensor_value_info("z", FLOAT, None)],
        [numpy_helper.from_array(np.array(0.25, np.float32), "ratio"), numpy_helper.from_array(np.array(True), "training"),
         numpy_helper.from_array(np.array([64, 32], np.int64), "shape"), numpy_helper.from_array(np.array([0], np.int64), "starts"),
         numpy_helper.from_array(np.array([INT64_MAX], np.int64), "ends")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8)
    reference = run_reference(model, {"x": x})["z"]
    lowering = LowerTrainingOps()
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowering.call(lowered)
    assert lowering.lowered == {"Dropout": 1, "SliceGrad": 1}
    actual = run_local(lowered, {"x": x})["z"]
    assert 0.1 < float((actual == 0).mean()) < 0.4
    np.testing.assert_array_equal(actual, reference)


# --- a whole training graph of many op types ------------------------------------------------------------


def _op_zoo_loss_graph():
    """A loss graph whose gradient graph holds ~20 training-only op types beyond the bundles' (ORT's own
    builder makes it): activations, both layer norms, dropout, division, softmaxes, split/concat,
    strided and reversed slices, the three gathers and the fused cross-entropy."""
    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    def const(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.array(value, dtype), name)

    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "W1"], ["h1"]), node("Add", ["h1", "b1"], ["h1b"]),
        node("LeakyRelu", ["h1b"], ["h2"], alpha=0.1), node("Relu", ["h2"], ["h3"]),
        node("Sigmoid", ["h1b"], ["s1"]), node("Tanh", ["h1b"], ["t1"]), node("Add", ["s1", "t1"], ["st"]),
        node("Gelu", ["st"], ["g1"], domain=MS), node("FastGelu", ["g1"], ["g2"], domain=MS),
        node("BiasGelu", ["g2", "b2"], ["g3"], domain=MS), node("QuickGelu", ["g3"], ["g4"], domain=MS, alpha=1.702),
        node("Add", ["g4", "h3"], ["h4"]),
        node("LayerNormalization", ["h4", "ln_w", "ln_b"], ["ln", "ln_mean", "ln_inv"], axis=-1, epsilon=1e-5),
        node("Pow", ["ln", "two"], ["sq"]), node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        node("Add", ["ms", "eps"], ["mse"]), node("Sqrt", ["mse"], ["rt"]), node("Reciprocal", ["rt"], ["inv"]),
        node("Mul", ["ln", "inv"], ["nrm"]), node("Mul", ["nrm", "rms_w"], ["rms"]),
        node("Dropout", ["rms", "ratio", "training"], ["d1", "m1"], seed=5),
        node("Div", ["d1", "W5"], ["dv"]),
        node("Softmax", ["dv"], ["sm"], axis=-1), node("LogSoftmax", ["dv"], ["lsm"], axis=-1), node("Mul", ["sm", "lsm"], ["p1"]),
        node("Split", ["p1", "split"], ["sp1", "sp2"], axis=1), node("Concat", ["sp2", "sp1", "W6"], ["cat"], axis=1),
        node("Slice", ["cat", "s_start", "s_end", "axis1", "s_steps"], ["sl"]),  # every other column
        node("Slice", ["cat", "r_start", "r_end", "axis0", "r_steps"], ["rv"]),  # the rows reversed
        node("Concat", ["sl", "rv"], ["slr"], axis=1),
        node("Gather", ["slr", "gidx"], ["ga"], axis=1), node("GatherElements", ["slr", "geidx"], ["ge"], axis=1),
        node("GatherND", ["slr", "gndidx"], ["gnd"]), node("Unsqueeze", ["gnd", "axis0"], ["gndu"]),
        node("Expand", ["gndu", "eshape"], ["gnde"]), node("Concat", ["ga", "ge", "gnde"], ["feat"], axis=1),
        node("MatMul", ["feat", "W2"], ["logits"]),
        node("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["ce", "lp"], reduction="mean", ignore_index=-100),
        node("ReduceMean", ["lp"], ["lpm"], axes=[1], keepdims=0), node("ReduceSum", ["lpm"], ["aux"], keepdims=0),
        node("Add", ["ce", "aux"], ["loss"]),
    ]
    initializers = [
        weight("W1", (4, 8)), weight("b1", (8,)), weight("b2", (8,)), weight("ln_w", (8,)), weight("ln_b", (8,)),
        weight("rms_w", (8,)), weight("W6", (2, 4)), weight("W2", (9, 3)),
        numpy_helper.from_array((np.abs(rng.standard_normal(8)) + 0.5).astype(np.float32), "W5"),
        const("ratio", 0.2), const("training", True, np.bool_), const("two", 2.0), const("eps", 1e-6),
        const("split", [3, 5], np.int64), const("axis0", [0], np.int64), const("axis1", [1], np.int64),
        const("s_start", [-11], np.int64), const("s_end", [INT64_MAX], np.int64), const("s_steps", [2], np.int64),
        const("r_start", [-1], np.int64), const("r_end", [INT64_MIN + 1], np.int64), const("r_steps", [-1], np.int64),
        const("gidx", [0, -1, 3, 0], np.int64), const("geidx", [[1, -2, 1], [0, 0, -1]], np.int64),
        const("gndidx", [[0, 2], [1, -1]], np.int64), const("eshape", [2, 2], np.int64),
    ]
    graph = helper.make_graph(nodes, "zoo", [helper.make_tensor_value_info("x", FLOAT, ["batch", 4]),
                                             helper.make_tensor_value_info("labels", INT64, ["batch"])],
                              [helper.make_tensor_value_info("loss", FLOAT, [])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8)


ZOO_TRAINABLE = ["W1", "b1", "b2", "ln_w", "ln_b", "rms_w", "W5", "W6", "W2"]
ZOO_OPS = {"BiasGeluGrad_dX", "ConcatTraining", "DivGrad", "DropoutGrad", "FastGeluGrad", "GatherElementsGrad", "GatherGrad",
           "GatherNDGrad", "GeluGrad", "InPlaceAccumulatorV2", "LayerNormalizationGrad", "LeakyReluGrad", "LogSoftmaxGrad_13",
           "QuickGeluGrad", "ReluGrad", "Scale", "SigmoidGrad", "SliceGrad", "SoftmaxCrossEntropyLossGrad", "SoftmaxGrad_13",
           "SplitTraining", "TanhGrad"}


def test_op_zoo_training_graph_gives_the_training_builds_loss_and_gradients(tmp_path):
    onnx.save_model(_op_zoo_loss_graph(), str(tmp_path / "loss.onnx"))
    training = onnx.load(str(build_training_graph(tmp_path / "loss.onnx", tmp_path / "artifacts", ZOO_TRAINABLE)))
    values = {t.name: numpy_helper.to_array(t) for t in _op_zoo_loss_graph().graph.initializer if t.name in ZOO_TRAINABLE}
    parameters = {value.name: values[value.name] for value in training.graph.input if value.name in values}
    errors = _compare_lowered_training_graph(training, tmp_path, {"x": _normal((2, 4), 40), "labels": np.array([1, -100])},
                                             parameters, expected_ops=ZOO_OPS, what="op zoo")
    assert set(errors) == {"loss", *ZOO_TRAINABLE}


# --- whole bundles -------------------------------------------------------------------------------------

BUNDLES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "phi3": ("phi3", {}),
    "gemma": ("gemma", {}),
    "llama-seq-cls": ("llama", {"task": "seq-cls", "num_labels": 2}),
    "bert-seq-cls": ("bert", {"task": "seq-cls", "num_labels": 2}),
    "bert-token-cls": ("bert", {"task": "token-cls", "num_labels": 3}),
    "llama-dora": ("llama", {"dora": True}),
    "phi3-dora": ("phi3", {"dora": True}),
    "llama-int4": ("llama", {"quantize": "int4"}),
    "llama-int8": ("llama", {"quantize": "int8"}),
    "llama-loss-chunks-0": ("llama", {"loss_chunks": 0}),
    "llama-no-recompute-activations": ("llama", {"recompute_activations": False}),
    "gemma-lora-dropout": ("gemma", {"dropout": 0.1}),
}


@pytest.fixture
def unlowered_graphs(monkeypatch):
    """Copies of every graph prepare hands to LowerTrainingOps before it is lowered (none with a prepare
    that does not lower: its bundle's graphs are the unlowered ones)."""
    captured = []
    original = LowerTrainingOps.call

    def capturing_call(self, model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        captured.append(copy)
        return original(self, model)

    monkeypatch.setattr(LowerTrainingOps, "call", capturing_call)
    return captured


def _prepared_graphs(tiny_model_factory, tmp_path, unlowered_graphs, model_type, settings):
    from helpers.bundles import prepare_tiny

    settings = dict(settings)
    task = settings.get("task", "causal-lm")
    bundle = tmp_path / "bundle"
    prepare_tiny(tiny_model_factory(model_type, task), bundle, **settings)
    training = next((m for m in unlowered_graphs if any(n.op_type == "InPlaceAccumulatorV2" for n in m.graph.node)), None)
    if training is None:
        training = onnx.load(str(bundle / "training_model.onnx"), load_external_data=False)
    evaluation = next((m for m in unlowered_graphs if not any(n.op_type == "InPlaceAccumulatorV2" for n in m.graph.node)), None)
    if evaluation is None:
        evaluation = onnx.load(str(bundle / "eval_model.onnx"), load_external_data=False)
    return bundle, training, evaluation


def _bundle_feeds(model, seed: int = 1) -> tuple[dict, dict]:
    """(user inputs, trainable parameters) for a training graph, from its inputs alone."""
    from ortft.prepare.tiny import TINY_VOCAB

    rng = np.random.default_rng(seed)
    user, parameters = {}, {}
    batch, length = 2, 12
    for value in model.graph.input:
        name, rank = value.name, len(value.type.tensor_type.shape.dim)
        if name == "input_ids":
            user[name] = rng.integers(3, TINY_VOCAB, size=(batch, length), dtype=np.int64)
        elif name == "attention_mask":
            user[name] = np.ones((batch, length), np.int64)
            user[name][-1, -3:] = 0
        elif name == "position_ids":
            user[name] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        elif name == "labels" and rank == 2:
            token_cls = any(output.name == "logits" for output in model.graph.output)
            low, high = (0, 2) if token_cls else (3, TINY_VOCAB)  # token-cls: tag ids; causal-lm: token ids
            labels = rng.integers(low, high, size=(batch, length), dtype=np.int64)
            labels[:, :3] = -100
            labels[-1, -3:] = -100
            user[name] = labels
        elif name == "labels":
            user[name] = rng.integers(0, 2, size=(batch,), dtype=np.int64)
        elif name == "lazy_reset_grad" or name.endswith(".accumulation.buffer"):
            continue
        else:
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            if "magnitude" in name:
                parameters[name] = rng.uniform(0.8, 1.2, size=shape).astype(np.float32)
            else:
                parameters[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return user, parameters


def _seed_dropouts(model) -> None:
    """Give every Dropout a seed of its own, so that both builds draw the same masks (checked per op)."""
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Dropout" and not any(attribute.name == "seed" for attribute in node.attribute):
            node.attribute.append(helper.make_attribute("seed", 1000 + index))


def _compare_lowered_training_graph(training, folder, user: dict, parameters: dict | None = None,
                                    expected_ops: set | None = None, what: str = "", version_rel: float = REL) -> dict:
    """Lower `training` (ORT's gradient graph, saved in `folder` beside its external data) and compare
    the loss and every gradient with the training build's run of the original graph: the lowered graph
    run by this process's onnxruntime (within `version_rel`: stock ORT's kernels differ from 1.19.2's), and
    run by the training build too (within REL: the lowering alone). Checks the contract the runtime
    relies on. Returns {output or parameter: relative L2 error of this process's run}."""
    assert training_only_ops(training), "the graph to lower has no training-only ops: not ORT's gradient graph"
    _seed_dropouts(training)
    if parameters is None:
        parameters = _bundle_feeds(training)[1]
    accumulators = {node.input[1]: node for node in training.graph.node if node.op_type == "InPlaceAccumulatorV2"}
    user_outputs = [value.name for value in training.graph.output if not value.name.endswith(".accumulation.out")]
    gradient_of = {node.input[0][: -len("_grad.accumulation.buffer")]: produced for produced, node in accumulators.items()}
    assert sorted(gradient_of) == sorted(parameters)

    reference_model = onnx.ModelProto()
    reference_model.CopyFrom(training)
    for produced in accumulators:
        reference_model.graph.output.append(helper.make_tensor_value_info(produced, FLOAT, None))
    onnx.save_model(reference_model, str(folder / "reference_training.onnx"))  # beside the external data
    buffers = {accumulators[gradient_of[name]].input[0]: np.zeros_like(value) for name, value in parameters.items()}

    opset, ir_version = [(o.domain, o.version) for o in training.opset_import], training.ir_version
    inputs = [value.name for value in training.graph.input]
    lowering = LowerTrainingOps()
    assert lowering.call(training).modified
    assert not training_only_ops(training)
    if expected_ops is not None:
        assert set(lowering.lowered) >= expected_ops, sorted(expected_ops - set(lowering.lowered))
    assert [(o.domain, o.version) for o in training.opset_import] == opset and training.ir_version == ir_version
    assert [value.name for value in training.graph.input] == [name for name in inputs if name in user or name in parameters]
    assert [value.name for value in training.graph.output] == user_outputs + [name + "_grad" for name in parameters]
    for value in training.graph.output[len(user_outputs):]:
        parameter = next(p for p in training.graph.input if p.name + "_grad" == value.name)
        assert value.type == parameter.type
    onnx.save_model(training, str(folder / "lowered_training.onnx"))

    lowered_names = user_outputs + [name + "_grad" for name in parameters]
    feeds = dict(user, **parameters)
    reference, lowered_by_reference = run_reference_many([
        (folder / "reference_training.onnx", dict(feeds, **buffers, lazy_reset_grad=np.array([True])),
         user_outputs + [gradient_of[name] for name in parameters]),
        (folder / "lowered_training.onnx", feeds, lowered_names)], EXACT_CONFIG)
    for result in (reference, lowered_by_reference):
        assert not isinstance(result, ReferenceError), result
    actual = run_local(folder / "lowered_training.onnx", feeds, lowered_names, config=EXACT_CONFIG)

    expected = {name: reference[name] for name in user_outputs}
    expected.update({name + "_grad": reference[gradient_of[name]] for name in parameters})
    errors, lowering_errors = {}, {}
    for name, value in expected.items():
        key = name[: -len("_grad")] if name not in user_outputs else name
        assert np.abs(value).max() > 0, f"{what}: {name} is zero in the reference: nothing compared"
        lowering_errors[key] = assert_close(lowered_by_reference[name], value, f"{what} {name} (lowered, training build)")
        errors[key] = assert_close(actual[name], value, f"{what} {name} (lowered, this onnxruntime)", version_rel)
    assert np.isfinite(float(actual["loss"]))
    print(f"{what}: loss {float(actual['loss']):.6f}; max relative L2 error over {len(errors)} outputs: "
          f"{max(errors.values()):.2e} (this onnxruntime), {max(lowering_errors.values()):.2e} (the training build); "
          f"lowered {lowering.lowered}")
    return errors


@pytest.mark.parametrize("variant", list(BUNDLES))
def test_lowered_bundle_gives_the_training_builds_loss_and_gradients(tiny_model_factory, tmp_path, unlowered_graphs, variant):
    model_type, settings = BUNDLES[variant]
    bundle, training, evaluation = _prepared_graphs(tiny_model_factory, tmp_path, unlowered_graphs, model_type, settings)
    user, _ = _bundle_feeds(training)
    errors = _compare_lowered_training_graph(training, bundle, user, what=variant)
    assert "loss" in errors

    before = evaluation.SerializeToString()
    eval_result = LowerTrainingOps().call(evaluation)
    if training_only_ops(onnx.load_from_string(before)):
        assert eval_result.modified and not training_only_ops(evaluation)
    else:
        assert not eval_result.modified and evaluation.SerializeToString() == before


@pytest.mark.slow
def test_lowered_smollm2_gives_the_training_builds_loss_and_gradients(smollm2_dir, tmp_path, unlowered_graphs):
    """SmolLM2-135M-Instruct (30 layers, LoRA r8 on every linear layer). The lowering alone (both graphs run
    by the training build) stays within 1e-5 and the loss is the same; stock onnxruntime's own kernels
    (MLAS of 1.32 against 1.19.2's) move the deepest gradients by up to ~1.2e-4 on this batch."""
    from ortft.config import PrepareConfig
    from ortft.prepare.pipeline import prepare_bundle

    bundle = tmp_path / "bundle"
    prepare_bundle(PrepareConfig(model=str(smollm2_dir), out=str(bundle), rank=8, alpha=16), quiet=True)
    training = next((m for m in unlowered_graphs if any(n.op_type == "InPlaceAccumulatorV2" for n in m.graph.node)), None)
    if training is None:
        training = onnx.load(str(bundle / "training_model.onnx"), load_external_data=False)
    user, parameters = _bundle_feeds(training)
    rng = np.random.default_rng(5)
    user["input_ids"] = rng.integers(3, 49152, size=user["input_ids"].shape, dtype=np.int64)
    user["labels"] = np.where(user["labels"] == -100, -100, user["input_ids"])
    errors = _compare_lowered_training_graph(training, bundle, user, parameters, what="SmolLM2-135M", version_rel=5e-4)
    assert errors["loss"] <= REL
