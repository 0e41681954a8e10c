"""ShareLoraInput: LoRA down-projections of one input become one product, with the same results."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.share_lora_input import ShareLoraInput

IN, RANKS, OUTS = 24, (4, 4, 2), (40, 8, 8)


def _three_adapters(transpose_read_elsewhere: bool = False):
    """x feeds three adapters (ranks 4, 4, 2), each MatMul(MatMul(x, A_i^T), B_i^T), plus a frozen W."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((IN, 40)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["base"])]
    outputs = [helper.make_tensor_value_info("base", TensorProto.FLOAT, ["t", 40])]
    for index, (rank, out) in enumerate(zip(RANKS, OUTS)):
        weights += [numpy_helper.from_array(rng.standard_normal((rank, IN)).astype(np.float32), f"A{index}"),
                    numpy_helper.from_array(rng.standard_normal((out, rank)).astype(np.float32), f"B{index}")]
        nodes += [
            helper.make_node("Transpose", [f"A{index}"], [f"At{index}"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", f"At{index}"], [f"h{index}"]),
            helper.make_node("Transpose", [f"B{index}"], [f"Bt{index}"], perm=[1, 0]),
            helper.make_node("MatMul", [f"h{index}", f"Bt{index}"], [f"y{index}"]),
        ]
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, ["t", out]))
    if transpose_read_elsewhere:
        outputs.append(helper.make_tensor_value_info("At0", TensorProto.FLOAT, [IN, RANKS[0]]))
    graph = helper.make_graph(nodes, "lora", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", IN])], outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    from ortft.runtime import onnxruntime_module

    session = onnxruntime_module().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _readers_of_x(model) -> list[str]:
    return [node.op_type for node in model.graph.node if "x" in node.input]


def test_down_projections_of_one_input_become_one_product_with_the_same_outputs():
    model = _three_adapters()
    x = np.random.default_rng(1).standard_normal((7, IN)).astype(np.float32)
    before = _run(model, x)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    result = ShareLoraInput({"A0", "A1", "A2", "B0", "B1", "B2"}).call(rewritten)
    assert result.modified and result.count == 3
    onnx.checker.check_model(rewritten)
    assert sorted(_readers_of_x(rewritten)) == ["MatMul", "MatMul"]  # the base product and the stacked one
    after = _run(rewritten, x)
    for want, got in zip(before, after):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_frozen_weights_lone_adapters_and_shared_transposes_are_left_alone():
    only_one_trainable = _three_adapters()
    assert not ShareLoraInput({"A0", "B0", "B1", "B2"}).call(only_one_trainable).modified  # A1, A2 frozen
    shared = _three_adapters(transpose_read_elsewhere=True)
    result = ShareLoraInput({"A0", "A1", "A2"}).call(shared)
    assert result.count == 2  # A1 and A2 only: A0's transposed copy is a graph output too
    assert "At0" in {output for node in shared.graph.node for output in node.output}


def test_a_bundle_with_shared_lora_inputs_trains_exactly_like_one_without(tiny_llama, tmp_path, monkeypatch):
    """Same losses and the same adapter weights after three steps (so the same gradients)."""
    from ortft.graph.base import PassResult
    from ortft.runtime import TrainingSession

    from helpers.bundles import prepare_tiny
    from helpers.reference import assert_trains_alike, batch_for

    shared = prepare_tiny(tiny_llama, tmp_path / "shared")
    with monkeypatch.context() as patch:
        patch.setattr(ShareLoraInput, "call", lambda self, model: PassResult(model, False, 0))
        plain = prepare_tiny(tiny_llama, tmp_path / "plain")
    layers = plain["model"]["num_layers"]
    assert shared["graph_patches"]["lora_inputs_shared"] == 5 * layers  # q, k, v and gate, up
    assert plain["graph_patches"]["lora_inputs_shared"] == 0
    batch = batch_for(plain)
    sessions = [TrainingSession(tmp_path / name, threads=1) for name in ("plain", "shared")]
    assert_trains_alike(sessions, batch, steps=3, rel=1e-6, rtol=1e-5, atol=1e-7)
