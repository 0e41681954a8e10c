"""Quantization graph passes on tiny hand-built graphs: quantize, opset upgrade, externalize, recompute."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.upgrade_opset import UpgradeOpset, default_opset
from ortft.graph.quantize_weights import QuantizeWeights, embedding_weights, linear_weights
from ortft.graph.recompute_dequantize import RecomputeDequantize


def _run(model, feeds):
    from ortft.runtime import onnxruntime_module

    ort = onnxruntime_module()
    options = ort.SessionOptions()
    # ORT fuses int4 DequantizeLinear + MatMul into MatMulNBits, by default with int8 activations (level 4).
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _mlp(opset: int, rng):
    """Gather(E) -> x; MatMul(x, W1 [in, out]); MatMul(x, Transpose(W2 [out, in])) -> ReduceMean over axis 1."""
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w2 = rng.standard_normal((16, 64)).astype(np.float32)
    table = rng.standard_normal((10, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "W1"], ["h1"]),
        helper.make_node("Transpose", ["W2"], ["W2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W2t"], ["h2"]),
    ]
    if opset >= 18:  # ReduceMean's axes: an attribute up to opset 17, an input from 18
        nodes.append(helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], np.int64))))
        nodes.append(helper.make_node("ReduceMean", ["h2", "axes"], ["s"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMean", ["h2"], ["s"], axes=[1], keepdims=1))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("h1", TensorProto.FLOAT, [3, 32]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [3, 1])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(table, "E")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), (w1, w2, table)


def test_upgrade_opset_rewrites_reduce_axes_and_keeps_outputs():
    model, _ = _mlp(17, np.random.default_rng(0))
    ids = np.array([1, 4, 9], np.int64)
    before = _run(model, {"ids": ids})
    assert UpgradeOpset(21).call(model).modified
    assert default_opset(model) == 21
    reduce = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    assert len(reduce.input) == 2 and not any(a.name == "axes" for a in reduce.attribute)  # axes became an input
    assert {t.name for t in model.graph.initializer} == {"W1", "W2", "E"}
    onnx.checker.check_model(model)
    for got, want in zip(_run(model, {"ids": ids}), before):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not UpgradeOpset(21).call(model).modified


def test_weight_finders():
    model, _ = _mlp(17, np.random.default_rng(0))
    assert linear_weights(model) == ["W1", "W2"]
    assert embedding_weights(model) == ["E"]


@pytest.mark.parametrize("scheme,symmetric,opset", [("int8", True, 17), ("int4", True, 21), ("int4", False, 21)])
def test_quantize_weights_matches_numpy_dequantization(scheme, symmetric, opset):
    from ortft.quantize import quantize

    rng = np.random.default_rng(1)
    model, (w1, w2, table) = _mlp(opset, rng)
    ids = np.array([1, 4, 9], np.int64)
    quantizer = QuantizeWeights(["W1", "W2", "E"], scheme, block_size=32, symmetric=symmetric)
    result = quantizer.call(model)
    assert result.modified and result.count == 2
    onnx.checker.check_model(model)
    assert [t.name for t in model.graph.initializer] == ["W2"]  # behind a Transpose: stays float
    assert "W2" in quantizer.skipped
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 2
    assert quantizer.layers["W1"]["axis"] == 0 and quantizer.layers["E"]["axis"] == 1
    # The graph computes exactly what numpy's dequantization gives.
    dq = {name: quantize(w, scheme, quantizer.layers[name]["axis"], 32, symmetric).dequantize()
          for name, w in (("W1", w1), ("E", table))}
    dq["W2"] = w2
    x = dq["E"][ids]
    h1, s = _run(model, {"ids": ids})
    np.testing.assert_allclose(h1, x @ dq["W1"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, (x @ dq["W2"].T).mean(axis=1, keepdims=True), rtol=1e-5, atol=1e-4)
    for layer in quantizer.layers.values():
        assert layer["bytes_after"] < layer["bytes_before"] / (3.5 if scheme == "int8" else 6)
        assert layer["max_rel_error"] < (0.01 if scheme == "int8" else 1 / 14 + 1e-6 if symmetric else 1 / 15 + 1e-6)


def test_quantize_int4_needs_opset_21():
    model, _ = _mlp(17, np.random.default_rng(0))
    with pytest.raises(ValueError, match="opset 21"):
        QuantizeWeights(["W1"], "int4").call(model)


def test_as_inputs_then_externalize_shares_one_data_file(tmp_path):
    """Two graphs read the same quantized tensors from one aligned file, with the maths unchanged."""
    from ortft.graph.externalize_inputs import ALIGNMENT, ExternalizeInputs, write_external_tensors
    from ortft.runtime import onnxruntime_module

    ids = np.array([0, 3, 5], np.int64)
    reference, _ = _mlp(21, np.random.default_rng(2))
    QuantizeWeights(["W1", "E"], "int4").call(reference)
    quantizer = QuantizeWeights(["W1", "E"], "int4", as_inputs=True)
    first, _ = _mlp(21, np.random.default_rng(2))
    quantizer.call(first)
    second = onnx.ModelProto()
    second.CopyFrom(first)
    offsets = write_external_tensors(quantizer.tensors, tmp_path / "shared.data")
    assert all(offset % ALIGNMENT == 0 for offset, _ in offsets.values())
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    want = _run(reference, {"ids": ids})
    for index, model in enumerate((first, second)):
        assert ExternalizeInputs(quantizer.tensors, "shared.data", offsets).call(model).count == len(quantizer.tensors)
        assert [v.name for v in model.graph.input] == ["ids"]
        path = tmp_path / f"graph{index}.onnx"
        onnx.save_model(model, str(path))
        stored = [t for t in model.graph.initializer if t.name in quantizer.tensors]
        assert len(stored) == len(quantizer.tensors)
        assert all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in stored)  # bytes in shared.data only
        got = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def _training_like_graph():
    """DQ(W) feeds a forward MatMul and a 'gradient' MatMul (its input ends in _grad), like ORT's graphs."""
    w = np.random.default_rng(3).standard_normal((32, 8)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]),
         helper.make_node("Mul", ["y", "y"], ["loss"]),
         helper.make_node("Mul", ["y", "dy_grad"], ["dy"]),  # the gradient depends on the forward pass
         helper.make_node("Gemm", ["dy", "W"], ["x_grad"], transB=1),
         helper.make_node("Identity", ["dy_grad"], ["unused"])],
        "train",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]), helper.make_tensor_value_info("dy_grad", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [2, 8]), helper.make_tensor_value_info("x_grad", TensorProto.FLOAT, [2, 32]),
         helper.make_tensor_value_info("unused", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w, "W")]), opset_imports=[helper.make_opsetid("", 21)])
    return model


def test_recompute_gives_backward_its_own_dequantize():
    model = _training_like_graph()
    QuantizeWeights(["W"], "int4").call(model)
    feeds = {"x": np.ones((2, 32), np.float32), "dy_grad": np.ones((2, 8), np.float32)}
    before = _run(model, feeds)
    result = RecomputeDequantize().call(model)
    assert result.count == 1
    onnx.checker.check_model(model)
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and dqs[0].input == dqs[1].input
    forward = next(n for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == "y")
    gradient = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert forward.input[1] == dqs[0].output[0] and gradient.input[1] == dqs[1].output[0]
    names = [n.name for n in model.graph.node]
    assert names.index(dqs[1].name) == names.index(dqs[0].name) + 1  # at the top, right after its original
    for got, want in zip(_run(model, feeds), before):
        np.testing.assert_array_equal(got, want)
    assert not RecomputeDequantize().call(model).modified  # nothing is shared any more


def _execution_order(model, feeds, tmp_path) -> list[str]:
    """Node names in the order ORT's CPU session ran them (from its profile)."""
    import json

    from ortft.runtime import onnxruntime_module

    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node as written
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    events = json.loads(open(session.end_profiling()).read())
    return [event["name"].removesuffix("_kernel_time") for event in events
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")]


def test_recompute_runs_the_backward_dequantize_after_the_forward_pass(tmp_path):
    """The clone must run when the gradient needs it, not before the forward pass (ORT's default order)."""
    model = _training_like_graph()
    for index, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
    QuantizeWeights(["W"], "int4").call(model)
    RecomputeDequantize().call(model)
    feeds = {"x": np.ones((2, 32), np.float32), "dy_grad": np.ones((2, 8), np.float32)}
    order = _execution_order(model, feeds, tmp_path)
    clone = next(n.name for n in model.graph.node if n.name.endswith("_recompute"))
    forward_matmul = next(n.name for n in model.graph.node if n.op_type == "MatMul")
    gradient = next(n.name for n in model.graph.node if n.op_type == "Gemm")
    assert order.index(forward_matmul) < order.index(clone) < order.index(gradient), order


def test_recompute_leaves_forward_only_dequantize_alone():
    model = _training_like_graph()
    QuantizeWeights(["W"], "int8").call(model)
    nodes = [n for n in model.graph.node if n.op_type != "Gemm"]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.output[1]
    assert not RecomputeDequantize().call(model).modified


@pytest.mark.parametrize("scheme,symmetric,opset", [("int8", True, 17), ("int4", True, 21), ("int4", False, 21)])
def test_a_large_weight_is_split_into_column_parts_with_the_same_values(scheme, symmetric, opset):
    """W1 [64, 32] with parts of at most 500 values: 5 DequantizeLinear + MatMul pairs joined by a Concat."""
    rng = np.random.default_rng(3)
    whole, _ = _mlp(opset, rng)
    split = onnx.ModelProto()
    split.CopyFrom(whole)
    ids = np.array([1, 4, 9], np.int64)
    whole_quantizer = QuantizeWeights(["W1"], scheme, block_size=32, symmetric=symmetric, part_elements=0)
    split_quantizer = QuantizeWeights(["W1"], scheme, block_size=32, symmetric=symmetric, part_elements=500)
    whole_quantizer.call(whole)
    split_quantizer.call(split)
    onnx.checker.check_model(split)
    assert split_quantizer.layers["W1"]["parts"] == 5 and whole_quantizer.layers["W1"]["parts"] == 1
    assert sum(n.op_type == "DequantizeLinear" for n in split.graph.node) == 5
    concat = next(n for n in split.graph.node if n.op_type == "Concat")
    assert list(concat.output) == ["h1"] and len(concat.input) == 5
    assert not any(n.op_type == "MatMul" and "W1_dequantized" in n.input for n in split.graph.node)
    assert split_quantizer.layers["W1"]["bytes_after"] == whole_quantizer.layers["W1"]["bytes_after"]
    for got, want in zip(_run(split, {"ids": ids}), _run(whole, {"ids": ids})):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_weights_read_as_out_in_are_never_split():
    """E is read by Gather ([out, in], groups on axis 1): column parts would not be a valid table."""
    model, _ = _mlp(21, np.random.default_rng(0))
    quantizer = QuantizeWeights(["E"], "int4", part_elements=16)
    quantizer.call(model)
    assert quantizer.layers["E"]["parts"] == 1
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 1
