"""DelayRecomputation: a recomputed clone runs in the backward pass under ORT's PRIORITY_BASED order,
computes the same values, and bundles train the same with it."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from ortft.graph.delay_recomputation import DelayRecomputation


def _toy_training_graph():
    """h = x @ w; act = Sigmoid(h); loss = sum(act); the backward reads a clone of act."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="MatMul"),
        helper.make_node("Sigmoid", ["h"], ["act"], name="Sigmoid"),
        helper.make_node("Sigmoid", ["h"], ["act_recompute"], name="Sigmoid_recompute"),  # where recompute.py puts it
        helper.make_node("ReduceSum", ["act"], ["loss"], name="ReduceSum", keepdims=0),
        helper.make_node("Shape", ["act"], ["act_shape"], name="ReduceSum_Grad/Shape"),
        helper.make_node("Expand", ["loss_grad", "act_shape"], ["act_grad"], name="ReduceSum_Grad/Expand"),
        helper.make_node("Sub", ["one", "act_recompute"], ["one_minus"], name="Sigmoid_Grad/Sub"),
        helper.make_node("Mul", ["act_recompute", "one_minus"], ["slope"], name="Sigmoid_Grad/Mul"),
        helper.make_node("Mul", ["act_grad", "slope"], ["h_grad"], name="Sigmoid_Grad/Mul_1"),
        helper.make_node("MatMul", ["x_t", "h_grad"], ["w_grad"], name="MatMul_Grad/MatMul"),
        helper.make_node("Transpose", ["x"], ["x_t"], name="MatMul_Grad/Transpose"),
    ]
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 9]
    graph = helper.make_graph(
        [nodes[i] for i in order], "toy",
        [helper.make_tensor_value_info("x", f, [4, 8]), helper.make_tensor_value_info("w", f, [8, 8])],
        [helper.make_tensor_value_info("loss", f, []), helper.make_tensor_value_info("w_grad", f, [8, 8])],
        [helper.make_tensor("loss_grad", f, [], [1.0]), helper.make_tensor("one", f, [], [1.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _execution_order(model, tmp_path) -> list[str]:
    """Node names in the order ORT's PRIORITY_BASED execution ran them (from its profile)."""
    from ortft.runtime import onnxruntime_module

    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((4, 8)).astype(np.float32), "w": rng.standard_normal((8, 8)).astype(np.float32)}
    outputs = session.run(None, feeds)
    with open(session.end_profiling(), encoding="utf-8") as handle:
        events = json.load(handle)
    names = [event["name"].removesuffix("_kernel_time") for event in events
             if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")]
    return names, outputs


def test_the_clone_waits_for_the_gradient_and_computes_the_same(tmp_path):
    model = _toy_training_graph()
    before, expected = _execution_order(model, tmp_path)
    assert before.index("Sigmoid_recompute") < before.index("ReduceSum")  # the lowest index ran first: too early
    result = DelayRecomputation().call(model)
    assert result.modified and result.count == 2  # the clone, and MatMul_Grad's Transpose of x (forward-only)
    onnx.checker.check_model(model)
    after, outputs = _execution_order(model, tmp_path)
    assert after.index("Sigmoid_recompute") > after.index("ReduceSum_Grad/Expand")
    for got, want in zip(outputs, expected):
        np.testing.assert_array_equal(got, want)
    assert DelayRecomputation().call(model).count == 0  # a delayed clone is not delayed twice


def test_a_bundle_trains_the_same_with_delayed_clones(tiny_llama, tmp_path, monkeypatch):
    from ortft.graph.base import PassResult
    from ortft.runtime import TrainingSession

    from helpers.bundles import prepare_tiny
    from helpers.reference import assert_trains_alike, batch_for

    delayed = prepare_tiny(tiny_llama, tmp_path / "delayed")
    with monkeypatch.context() as patch:
        patch.setattr(DelayRecomputation, "call", lambda self, model: PassResult(model, False, 0))
        plain = prepare_tiny(tiny_llama, tmp_path / "plain")
    layers = delayed["model"]["num_layers"]
    # at least each layer's act(gate) and post-attention norm (the first layer's input norm reads the embedding,
    # whose backward is not reached within a few nodes; the attention's scalar clones count too)
    assert delayed["graph_patches"]["recomputation_delayed"] >= 2 * layers
    graph = onnx.load(str(tmp_path / "delayed" / "training_model.onnx"), load_external_data=False).graph
    waiting = {node.name for node in graph.node if node.name.endswith("_recompute")
               and any(name.startswith("ortft_delay") for name in node.input)}
    assert sum("mlp/act_fn" in name for name in waiting) == layers
    assert plain["graph_patches"]["recomputation_delayed"] == 0
    sessions = [TrainingSession(tmp_path / name, threads=1) for name in ("plain", "delayed")]
    assert_trains_alike(sessions, batch_for(plain, seq=20), steps=2, rel=1e-6, rtol=1e-5, atol=1e-7)
