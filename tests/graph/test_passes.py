"""The graph passes on tiny hand-built graphs: each does its one job and keeps the maths."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.disable_dropout import DisableDropout
from ortft.graph.add_optional_outputs import AddOptionalOutputs
from ortft.graph.pretranspose_frozen_weights import PretransposeFrozenWeights


def _run(model, feeds):
    from ortft.runtime import onnxruntime_module

    ort = onnxruntime_module()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _linear_graph(frozen: np.ndarray, trainable: np.ndarray):
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["h"]),
        helper.make_node("Transpose", ["A"], ["At"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "At"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, trainable.shape[0]])],
        [numpy_helper.from_array(frozen, "W"), numpy_helper.from_array(trainable, "A")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_pretranspose_keeps_outputs_and_removes_frozen_transposes():
    rng = np.random.default_rng(0)
    frozen = rng.standard_normal((4, 3)).astype(np.float32)  # [out, in]
    trainable = rng.standard_normal((5, 4)).astype(np.float32)
    model = _linear_graph(frozen, trainable)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    before = _run(model, {"x": x})[0]
    result = PretransposeFrozenWeights(trainable={"A"}).call(model)
    assert result.modified and result.count == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Transpose", "MatMul"]
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    np.testing.assert_array_equal(weights["W"], frozen.T)
    np.testing.assert_array_equal(weights["A"], trainable)  # trainable layout untouched
    np.testing.assert_allclose(_run(model, {"x": x})[0], before, rtol=1e-6)


def test_pretranspose_skips_weights_with_other_consumers():
    rng = np.random.default_rng(1)
    model = _linear_graph(rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32))
    model.graph.node.append(helper.make_node("ReduceSumSquare", ["W"], ["norm"], keepdims=0))
    assert not PretransposeFrozenWeights(trainable={"A"}).call(model).modified


def test_optional_outputs_added_to_layernorm_and_dropout():
    nodes = [
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["ln"], axis=-1),
        helper.make_node("Dropout", ["ln"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones(4, np.float32), "scale"), numpy_helper.from_array(np.zeros(4, np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    before = _run(model, {"x": x})[0]
    result = AddOptionalOutputs().call(model)
    assert result.count == 3  # mean + inv_std_dev; mask
    assert len(model.graph.node[0].output) == 3 and len(model.graph.node[1].output) == 2
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, {"x": x})[0], before, rtol=1e-6)
    assert AddOptionalOutputs().call(model).count == 0  # idempotent


def test_disable_dropout_makes_eval_deterministic():
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
    on = numpy_helper.from_array(np.array(True), "training_mode")
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x", "ratio", "training_mode"], ["y"])], "dropout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [ratio, on],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.ones((1, 1000), np.float32)
    assert (_run(model, {"x": x})[0] == 0).any()  # training mode drops
    assert DisableDropout().call(model).count == 1
    np.testing.assert_array_equal(_run(model, {"x": x})[0], x)


def _tied_head_graph(hidden_rank: int):
    """Gather(E, ids) -> hidden; logits = MatMul(hidden, Transpose(E)): a tied LM head as torch exports it."""
    table = np.random.default_rng(4).standard_normal((11, 6)).astype(np.float32)
    shape = [3] if hidden_rank == 2 else [1, 3]
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["hidden"]),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["hidden", "Et"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape + [11])],
        [numpy_helper.from_array(table, "E")],
        value_info=[helper.make_tensor_value_info("hidden", TensorProto.FLOAT, shape + [6])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_transpose_into_gemm_reads_the_tied_table_directly():
    from ortft.graph.transpose_into_gemm import TransposeIntoGemm

    model = _tied_head_graph(hidden_rank=2)
    feeds = {"ids": np.array([0, 4, 10], np.int64)}
    (before,) = _run(model, feeds)
    result = TransposeIntoGemm().call(model)
    assert result.count == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Gather", "Gemm"]
    gemm = model.graph.node[1]
    assert list(gemm.input) == ["hidden", "E"] and helper.get_attribute_value(gemm.attribute[0]) == 1
    (after,) = _run(model, feeds)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_transpose_into_gemm_leaves_batched_matmul_alone():
    from ortft.graph.transpose_into_gemm import TransposeIntoGemm

    model = _tied_head_graph(hidden_rank=3)  # Gemm is 2-D only
    assert not TransposeIntoGemm().call(model).modified
    assert [n.op_type for n in model.graph.node] == ["Gather", "Transpose", "MatMul"]
