"""ShareDequantized: a DequantizeLinear with several readers stays one DequantizeLinear inside ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.share_dequantized import SHARED_SUFFIX, ShareDequantized

VOCAB, HIDDEN = 50, 8


def _table_read_three_times():
    """An int8 table dequantized once and read by a Gather and two Gemms (an embedding and two head slices)."""
    rng = np.random.default_rng(0)
    table = rng.integers(-127, 128, (VOCAB, HIDDEN)).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["table_q", "scale"], ["table"], name="dq"),
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),
        helper.make_node("Gemm", ["hidden_a", "table"], ["logits_a"], transB=1),
        helper.make_node("Gemm", ["hidden_b", "table"], ["logits_b"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "shared_table",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
         helper.make_tensor_value_info("hidden_a", TensorProto.FLOAT, [2, HIDDEN]),
         helper.make_tensor_value_info("hidden_b", TensorProto.FLOAT, [4, HIDDEN])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
         for name, shape in (("embedded", [3, HIDDEN]), ("logits_a", [2, VOCAB]), ("logits_b", [4, VOCAB]))],
        [numpy_helper.from_array(table, "table_q"), numpy_helper.from_array(np.float32(0.02), "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run_as_training_sessions_do(model, tmp_path, name):
    """Run at graph optimisation level 1 (as quantized bundles are) and return (outputs, optimised graph)."""
    from ortft.runtime import keep_dequantize_separate, onnxruntime_module, session_options

    options = session_options(threads=1)
    keep_dequantize_separate(options)
    options.optimized_model_filepath = str(tmp_path / f"{name}.optimized.onnx")
    session = onnxruntime_module().InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {"ids": np.array([0, 7, 49], dtype=np.int64),
             "hidden_a": rng.standard_normal((2, HIDDEN)).astype(np.float32),
             "hidden_b": rng.standard_normal((4, HIDDEN)).astype(np.float32)}
    return session.run(None, feeds), onnx.load(options.optimized_model_filepath).graph


def test_ort_dequantizes_a_shared_weight_once_and_the_outputs_do_not_change(tmp_path):
    plain = _table_read_three_times()
    shared = onnx.ModelProto()
    shared.CopyFrom(plain)
    result = ShareDequantized().call(shared)
    assert result.modified and result.count == 1
    onnx.checker.check_model(shared)
    readers = [node for node in shared.graph.node if "table" + SHARED_SUFFIX in node.input]
    assert [node.op_type for node in readers] == ["Gather", "Gemm", "Gemm"]
    assert [node.op_type for node in shared.graph.node if "table" in node.input] == ["Flatten"]

    plain_outputs, plain_optimized = _run_as_training_sessions_do(plain, tmp_path, "plain")
    shared_outputs, shared_optimized = _run_as_training_sessions_do(shared, tmp_path, "shared")
    count = lambda graph: sum(node.op_type == "DequantizeLinear" for node in graph.node)  # noqa: E731
    assert count(plain_optimized) == 3  # ORT's EnsureUniqueDQForNodeUnit: one copy per reader
    assert count(shared_optimized) == 1
    for expected, got in zip(plain_outputs, shared_outputs):
        np.testing.assert_array_equal(got, expected)


def test_a_single_reader_is_left_alone():
    model = _table_read_three_times()
    del model.graph.node[2:]
    del model.graph.output[1:]
    assert not ShareDequantized().call(model).modified
    assert len(model.graph.node) == 2


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_bundle_with_a_quantized_tied_table_trains_as_without_the_pass(tiny_model_factory, tmp_path, monkeypatch, scheme):
    """Same losses, eval loss and adapter weights after 3 AdamW steps; the manifest counts the shared weights."""
    from ortft.prepare import graph_stages
    from ortft.runtime import TrainingSession

    from helpers.bundles import prepare_tiny
    from helpers.reference import assert_trains_alike, batch_for

    tied = tiny_model_factory("llama", tie_word_embeddings=True)
    shared = prepare_tiny(tied, tmp_path / "shared", quantize=scheme, quantize_embeddings=True)
    assert shared["quantization"]["dequantize_shared"] == {"training_model.onnx": 2, "eval_model.onnx": 1}
    monkeypatch.setattr(graph_stages, "ShareDequantized", _Unchanged)
    plain = prepare_tiny(tied, tmp_path / "plain", quantize=scheme, quantize_embeddings=True)
    assert plain["quantization"]["dequantize_shared"] == {"training_model.onnx": 0, "eval_model.onnx": 0}
    batch = batch_for(shared)
    sessions = [TrainingSession(tmp_path / name, threads=1) for name in ("plain", "shared")]
    assert_trains_alike(sessions, batch, steps=3, rel=1e-6, rtol=1e-6, atol=1e-7)


class _Unchanged(ShareDequantized):
    """Stands in for ShareDequantized (under its name): changes nothing."""

    def call(self, model):
        from ortft.graph.base import PassResult

        return PassResult(model, False, 0)
