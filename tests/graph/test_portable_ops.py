"""PortableOps: Size becomes ReduceProd(Shape), Transpose(Gemm) becomes one Gemm, the values stay exact, and
Gemms the rewrite must not touch are left alone; prepared bundles hold neither pattern."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ortft.graph.portable_ops import PortableOps


def _model(nodes, outputs, inputs=("a", "b", "c")):
    f = TensorProto.FLOAT
    shapes = {"a": [6, 4], "b": [6, 5], "c": [5, 4]}
    graph = helper.make_graph(nodes, "portable",
                              [helper.make_tensor_value_info(name, f, shapes[name]) for name in inputs],
                              [helper.make_tensor_value_info(name, TensorProto.INT64, []) if name.startswith("size")
                               else helper.make_tensor_value_info(name, f, [None, None]) for name in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model) -> list[np.ndarray]:
    from ortft.runtime import onnxruntime_module

    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no GemmTransposeFusion of ORT's
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {value.name: rng.standard_normal([d.dim_value for d in value.type.tensor_type.shape.dim]).astype(np.float32)
             for value in model.graph.input}
    return session.run(None, feeds)


@pytest.mark.parametrize("trans_a, trans_b, first, second", [(1, 0, "a", "b"), (0, 0, "a_t", "b"), (1, 1, "a", "b_t"),
                                                             (0, 1, "a_t", "b_t")])
def test_transposed_gemm_becomes_one_exact_gemm(trans_a, trans_b, first, second):
    nodes = [helper.make_node("Transpose", ["a"], ["a_t"], perm=[1, 0], name="prep_a"),
             helper.make_node("Transpose", ["b"], ["b_t"], perm=[1, 0], name="prep_b"),
             helper.make_node("Gemm", [first, second], ["product"], name="Gemm", transA=trans_a, transB=trans_b, alpha=0.5),
             helper.make_node("Transpose", ["product"], ["weight_grad"], perm=[1, 0], name="Gemm_Transpose")]
    model = _model(nodes, ["weight_grad"], inputs=("a", "b"))
    before = _run(model)
    result = PortableOps().call(model)
    assert result.modified and result.count == 1
    assert [node.name for node in model.graph.node] == ["prep_a", "prep_b", "Gemm"]
    gemm = model.graph.node[-1]
    assert list(gemm.input) == [second, first] and list(gemm.output) == ["weight_grad"]
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in gemm.attribute}
    assert attributes == {"transA": 1 - trans_b, "transB": 1 - trans_a, "alpha": 0.5}
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(_run(model)[0], before[0])


def test_gemms_the_rewrite_must_keep():
    nodes = [helper.make_node("Gemm", ["a", "b"], ["read_twice"], transA=1, name="read_twice"),
             helper.make_node("Transpose", ["read_twice"], ["t1"], perm=[1, 0], name="t1"),
             helper.make_node("Neg", ["read_twice"], ["other"], name="other"),
             helper.make_node("Gemm", ["a", "b", "c"], ["with_bias"], transA=1, name="with_bias"),
             helper.make_node("Transpose", ["with_bias"], ["t2"], perm=[1, 0], name="t2"),
             helper.make_node("Gemm", ["a", "b"], ["graph_output"], transA=1, name="graph_output"),
             helper.make_node("Transpose", ["graph_output"], ["t3"], name="t3")]
    model = _model(nodes, ["t1", "other", "t2", "graph_output", "t3"])
    result = PortableOps().call(model)
    assert not result.modified and result.count == 0
    assert [node.op_type for node in model.graph.node] == ["Gemm", "Transpose", "Neg", "Gemm", "Transpose", "Gemm", "Transpose"]


def test_size_becomes_the_product_of_the_shape():
    nodes = [helper.make_node("Size", ["a"], ["size_a"], name="size_a"),
             helper.make_node("Sub", ["size_a", "size_a"], ["size_zero"], name="size_zero")]
    model = _model(nodes, ["size_a", "size_zero"], inputs=("a",))
    before = _run(model)
    assert PortableOps().call(model).count == 1
    assert [node.op_type for node in model.graph.node] == ["Shape", "ReduceProd", "Sub"]
    onnx.checker.check_model(model, full_check=True)
    after = _run(model)
    assert after[0].shape == () and after[0].dtype == np.int64
    assert [value.tolist() for value in after] == [value.tolist() for value in before] == [24, 0]


@pytest.mark.slow
def test_prepared_bundle_has_no_size_and_no_transposed_gemm(tiny_llama, tmp_path):
    from helpers.cli import ok, run_ortft

    bundle = tmp_path / "bundle"
    ok(run_ortft("prepare", tiny_llama, "--out", bundle, "--rank", "4", "--alpha", "8"))
    for file_name in ("training_model.onnx", "eval_model.onnx"):
        graph = onnx.load(str(bundle / file_name), load_external_data=False).graph
        producer = {output: node for node in graph.node for output in node.output}
        assert not [node.name for node in graph.node if node.op_type == "Size"], file_name
        transposed = [node.name for node in graph.node if node.op_type == "Transpose"
                      and getattr(producer.get(node.input[0]), "op_type", None) == "Gemm"]
        assert not transposed, (file_name, transposed)
