"""ScaleLoraIntermediate: the scale moves to the rank-r tensor, results stay the same."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.scale_lora_intermediate import ScaleLoraIntermediate

IN, OUT, RANK = 24, 40, 4


def _lora_graph(scale: float, constant_node: bool = True, extra_reader: bool = False):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W", (IN, OUT)), ("A", (IN, RANK)), ("B", (RANK, OUT)))]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["base"]),
        helper.make_node("MatMul", ["x", "A"], ["down"]),
        helper.make_node("MatMul", ["down", "B"], ["up"]),
    ]
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.array(scale, np.float32))))
    else:
        weights.append(numpy_helper.from_array(np.array(scale, np.float32), "scale"))
    nodes += [helper.make_node("Mul", ["up", "scale"], ["scaled"]), helper.make_node("Add", ["base", "scaled"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", OUT])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("up", TensorProto.FLOAT, ["t", OUT]))
    graph = helper.make_graph(nodes, "lora", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", IN])], outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    from ortft.runtime import onnxruntime_module

    session = onnxruntime_module().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("scale, constant_node, exact", [(2.0, True, True), (0.5, False, True), (1.7, True, False)])
def test_scale_moves_to_the_rank_r_tensor_with_the_same_result(scale, constant_node, exact):
    model = _lora_graph(scale, constant_node)
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    result = ScaleLoraIntermediate().call(moved)
    assert result.modified and result.count == 1
    onnx.checker.check_model(moved)
    mul = next(node for node in moved.graph.node if node.op_type == "Mul")
    assert list(mul.input) == ["down", "scale"]  # [tokens, r], not [tokens, out]
    x = np.random.default_rng(1).standard_normal((7, IN)).astype(np.float32)
    expected, actual = _run(model, x), _run(moved, x)
    if exact:  # a power-of-two scale is exact in floating point
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_full_width_product_read_elsewhere_is_left_alone():
    model = _lora_graph(2.0, extra_reader=True)
    assert not ScaleLoraIntermediate().call(model).modified


def test_every_adapted_layer_of_a_bundle_is_rewritten(tiny_llama, tmp_path):
    from helpers.bundles import prepare_tiny

    manifest = prepare_tiny(tiny_llama, tmp_path / "b", targets="q_proj,v_proj,down_proj")
    adapted = len({entry["module"] for entry in manifest["trainable"]})
    assert manifest["graph_patches"]["lora_scales_moved"] == adapted > 0
