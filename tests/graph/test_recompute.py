"""Tests of ortft/graph/recompute.py on hand-built graphs (a SwiGLU MLP, an RMS norm feeding an adapter) with
gradient-like nodes (names ending in _grad), and on a bundle."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.recompute import RECOMPUTE_SUFFIX
from ortft.graph.recompute_activations import RecomputeActivations
from ortft.graph.recompute_norms import RecomputeNorms


def _swiglu_training_like():
    """y = (Sigmoid(x Wg) * (x Wu)) Wd, plus the backward nodes ORT would add, reading gate, up, act and prod."""
    rng = np.random.default_rng(5)
    weights = {"Wg": (8, 16), "Wu": (8, 16), "Wd": (16, 8), "A": (16, 2)}
    initializers = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in weights.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "Wg"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["x", "Wu"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["act"], name="act_fn"),
        helper.make_node("Mul", ["act", "up"], ["prod"], name="mlp_mul"),
        helper.make_node("MatMul", ["prod", "Wd"], ["y"], name="down_proj"),
        helper.make_node("MatMul", ["prod", "A"], ["lora"], name="lora_A"),
        helper.make_node("Mul", ["x", "x"], ["square"], name="square"),  # read by the backward, but x is not
        # backward: dy -> d_prod; A's gradient reads prod; MulGrad reads act and up; the activation's reads gate
        helper.make_node("Mul", ["y", "y_grad"], ["dy"], name="loss_grad"),  # the gradient depends on the forward pass
        helper.make_node("MatMul", ["dy", "WdT"], ["prod_grad"], name="down_grad"),
        helper.make_node("Gemm", ["prod", "prod_grad"], ["A_partial_grad"], transA=1, name="A_grad"),
        helper.make_node("Mul", ["prod_grad", "act"], ["up_grad"], name="up_grad"),
        helper.make_node("Mul", ["prod_grad", "up"], ["act_grad"], name="act_grad"),
        helper.make_node("Mul", ["act_grad", "gate"], ["gate_grad"], name="gate_grad"),
        helper.make_node("Mul", ["square", "y_grad"], ["x_grad"], name="x_grad"),
    ]
    initializers.append(numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "WdT"))
    graph = helper.make_graph(
        nodes, "swiglu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8]), helper.make_tensor_value_info("y_grad", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, None]) for name in ("y", "lora", "A_partial_grad", "up_grad", "gate_grad", "x_grad")],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds():
    rng = np.random.default_rng(6)
    return {"x": rng.standard_normal((4, 8)).astype(np.float32), "y_grad": rng.standard_normal((4, 8)).astype(np.float32)}


def _session(model, tmp_path=None):
    from ortft.runtime import onnxruntime_module

    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node as written
    if tmp_path is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / "profile")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_activation_and_product_are_recomputed_in_a_chain_with_the_same_results():
    model = _swiglu_training_like()
    before = _session(model).run(None, _feeds())
    result = RecomputeActivations().call(model)
    onnx.checker.check_model(model)
    assert result.count == 2
    by_name = {node.name: node for node in model.graph.node}
    act_clone, prod_clone = by_name["act_fn" + RECOMPUTE_SUFFIX], by_name["mlp_mul" + RECOMPUTE_SUFFIX]
    assert list(act_clone.input) == ["gate"]
    assert list(prod_clone.input) == [act_clone.output[0], "up"]  # the chain: the product's clone reads act's clone
    assert list(by_name["A_grad"].input) == [prod_clone.output[0], "prod_grad"]
    assert list(by_name["up_grad"].input) == ["prod_grad", act_clone.output[0]]
    assert list(by_name["down_proj"].input) == ["prod", "Wd"] and list(by_name["mlp_mul"].input) == ["act", "up"]
    assert "square" + RECOMPUTE_SUFFIX not in by_name  # x is not kept for the backward: recomputing would keep it
    names = [node.name for node in model.graph.node]
    assert names.index(act_clone.name) == names.index("act_fn") + 1 and names.index(prod_clone.name) == names.index("mlp_mul") + 1
    for got, want in zip(_session(model).run(None, _feeds()), before):
        np.testing.assert_array_equal(got, want)
    assert not RecomputeActivations().call(model).modified


def test_clones_run_in_the_backward_pass_after_the_forward_is_done(tmp_path):
    """ORT's order: each clone after the forward pass's last layer and before its backward reader."""
    model = _swiglu_training_like()
    RecomputeActivations().call(model)
    session = _session(model, tmp_path)
    session.run(None, _feeds())
    events = json.loads(open(session.end_profiling()).read())
    order = [event["name"].removesuffix("_kernel_time") for event in events
             if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")]
    assert order.index("down_proj") < order.index("act_fn" + RECOMPUTE_SUFFIX), order
    assert order.index("down_proj") < order.index("mlp_mul" + RECOMPUTE_SUFFIX), order
    assert order.index("mlp_mul" + RECOMPUTE_SUFFIX) < order.index("A_grad"), order


def test_nothing_read_by_the_backward_means_nothing_to_recompute():
    model = _swiglu_training_like()
    forward_only = [node for node in model.graph.node if not any(name.endswith("_grad") for name in list(node.input) + list(node.output))]
    del model.graph.node[:]
    model.graph.node.extend(forward_only)
    assert not RecomputeActivations().call(model).modified


def test_a_bundle_with_recomputed_activations_trains_exactly_like_one_without(tiny_llama, tmp_path):
    """Same losses and the same adapter weights after three steps (the gradients are the same)."""
    from ortft.runtime import TrainingSession

    from helpers.bundles import prepare_tiny
    from helpers.reference import assert_trains_alike, batch_for

    plain = prepare_tiny(tiny_llama, tmp_path / "plain", recompute_activations=False)
    recomputed = prepare_tiny(tiny_llama, tmp_path / "recomputed")  # the default
    assert plain["graph_patches"]["recomputed_activations"] == plain["graph_patches"]["recomputed_norms"] == 0
    assert recomputed["graph_patches"]["recomputed_activations"] == 2 * plain["model"]["num_layers"]  # act, act * up
    assert recomputed["graph_patches"]["recomputed_norms"] == 2 * plain["model"]["num_layers"]  # both norms of a layer
    batch = batch_for(plain)
    sessions = [TrainingSession(tmp_path / name, threads=1) for name in ("plain", "recomputed")]
    assert_trains_alike(sessions, batch, steps=3, rel=1e-6, rtol=1e-5, atol=1e-7)


def _norm_training_like():
    """h = RMSNorm(x) W + (RMSNorm(x) A) B, with a norm gradient reading x and inv_std and A's gradient reading h_in."""
    rng = np.random.default_rng(7)
    weights = {"scale": (8,), "W": (8, 8), "A": (8, 2), "B": (2, 8)}
    initializers = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in weights.items()]
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["normed", "inv_std"], axis=-1, epsilon=1e-5,
                         stash_type=1, name="input_layernorm"),
        helper.make_node("MatMul", ["normed", "W"], ["base"], name="base_proj"),
        helper.make_node("MatMul", ["normed", "A"], ["down"], name="lora_A"),
        helper.make_node("MatMul", ["down", "B"], ["lora"], name="lora_B"),
        helper.make_node("Add", ["base", "lora"], ["y"], name="add"),
        # backward: the norm's gradient reads x and inv_std; A's gradient reads the normed input
        helper.make_node("MatMul", ["y_grad", "Bt"], ["down_grad"], name="lora_B_Grad/down"),
        helper.make_node("Gemm", ["normed", "down_grad"], ["A_grad"], transA=1, name="lora_A_Grad/weight"),
        helper.make_node("Mul", ["x", "inv_std"], ["x_grad"], name="input_layernorm_Grad/x"),
    ]
    initializers.append(numpy_helper.from_array(rng.standard_normal((8, 2)).astype(np.float32), "Bt"))
    graph = helper.make_graph(
        nodes, "norm_lora",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8]), helper.make_tensor_value_info("y_grad", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "A_grad", "x_grad")],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_normed_input_of_an_adapter_is_recomputed_from_the_kept_norm_input():
    """x * inv_std * scale, from the input and inverse standard deviation the norm's gradient keeps."""
    model = _norm_training_like()
    before = _session(model).run(None, _feeds())
    result = RecomputeNorms().call(model)  # (no onnx checker: SimplifiedLayerNormalization is ORT's)
    assert result.count == 1
    names = [node.name for node in model.graph.node]
    by_name = {node.name: node for node in model.graph.node}
    unscaled, scaled = by_name["input_layernorm_unscaled" + RECOMPUTE_SUFFIX], by_name["input_layernorm" + RECOMPUTE_SUFFIX]
    assert unscaled.op_type == scaled.op_type == "Mul"
    assert list(unscaled.input) == ["x", "inv_std"] and list(scaled.input) == [unscaled.output[0], "scale"]
    assert list(scaled.output) == ["normed" + RECOMPUTE_SUFFIX]
    assert names.index(unscaled.name) == names.index("input_layernorm") + 1  # at the top: ORT runs it late
    assert list(by_name["lora_A_Grad/weight"].input) == [scaled.output[0], "down_grad"]
    assert list(by_name["base_proj"].input)[0] == "normed" and list(by_name["lora_A"].input)[0] == "normed"
    for got, want in zip(_session(model).run(None, _feeds()), before):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not RecomputeNorms().call(model).modified
    assert not RecomputeActivations().call(_norm_training_like()).modified  # norms are not activations


def test_a_norm_whose_inverse_std_the_backward_does_not_keep_is_left_alone():
    model = _norm_training_like()
    for node in model.graph.node:
        if node.name == "input_layernorm_Grad/x":
            node.input[1] = "x"  # the backward no longer reads inv_std: recomputing would keep it alive
    assert not RecomputeNorms().call(model).modified
