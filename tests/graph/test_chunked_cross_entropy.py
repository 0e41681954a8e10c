"""ChunkedCrossEntropy: the same loss as SoftmaxCrossEntropyLoss, and bundles that train the same."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortft.graph.chunked_cross_entropy import ChunkedCrossEntropy

HIDDEN, VOCAB = 16, 3000


def _head_and_loss(ignore_index: int | None = -100, transposed: bool = True, cast: bool = False):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, HIDDEN) if transposed else (HIDDEN, VOCAB)).astype(np.float32)
    loss_attributes = {"reduction": "mean"} | ({"ignore_index": ignore_index} if ignore_index is not None else {})
    head = (helper.make_node("Gemm", ["hidden", "table"], ["logits"], transB=1) if transposed
            else helper.make_node("MatMul", ["hidden", "table"], ["logits"]))
    casts = [helper.make_node("Cast", ["logits"], ["logits_float"], to=TensorProto.FLOAT)] if cast else []
    loss = helper.make_node("SoftmaxCrossEntropyLoss", ["logits_float" if cast else "logits", "labels"], ["loss", "log_prob"],
                            **loss_attributes)
    graph = helper.make_graph(
        [head, *casts, loss],
        "head_and_loss",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["rows", HIDDEN]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["rows"])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(model):
    from ortft.runtime import onnxruntime_module

    return onnxruntime_module().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _rewritten(model, chunks: int, min_rows: int = 1):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = ChunkedCrossEntropy(chunks, min_rows).call(copy)
    assert result.modified and result.count == 1
    onnx.checker.check_model(copy)
    return copy


@pytest.mark.parametrize("transposed, cast", [(True, False), (False, False), (True, True)])
def test_same_loss_as_softmax_cross_entropy_for_any_row_count(transposed, cast):
    model = _head_and_loss(transposed=transposed, cast=cast)
    chunked = _rewritten(model, chunks=3)
    ops = [node.op_type for node in chunked.graph.node]
    assert ops.count("SoftmaxCrossEntropyLoss") == 0
    assert ops.count("Gemm" if transposed else "MatMul") == 3  # the head runs per slice
    assert ops.count("Cast") == 3 * (2 + cast) + 1  # per slice: the stabiliser's two (+ the logits' one); the mask
    plain, fast = _session(model), _session(chunked)
    rng = np.random.default_rng(1)
    for rows in (1, 2, 3, 7, 40):  # fewer rows than slices leaves empty slices
        hidden = (rng.standard_normal((rows, HIDDEN)) * 4).astype(np.float32)  # logits spread over ~+-60
        labels = rng.integers(0, VOCAB, rows).astype(np.int64)
        if rows > 2:
            labels[1] = -100
        feeds = {"hidden": hidden, "labels": labels}
        expected = plain.run(None, feeds)[0]
        assert fast.run(None, feeds)[0] == pytest.approx(float(expected), rel=2e-6)


def test_no_ignore_index_counts_every_row_and_all_ignored_rows_give_zero_not_nan():
    model = _head_and_loss(ignore_index=None)
    rng = np.random.default_rng(2)
    feeds = {"hidden": rng.standard_normal((5, HIDDEN)).astype(np.float32), "labels": rng.integers(0, VOCAB, 5)}
    assert _session(_rewritten(model, 2)).run(None, feeds)[0] == pytest.approx(float(_session(model).run(None, feeds)[0]), rel=2e-6)
    ignored = {"hidden": feeds["hidden"], "labels": np.full(5, -100, dtype=np.int64)}
    assert float(_session(_rewritten(_head_and_loss(), 2)).run(None, ignored)[0]) == 0.0


def test_extreme_logits_stay_finite_and_exact():
    """A label 300 below the best logit: probability 0 in float32, yet the loss is exact (no floor)."""
    model = _head_and_loss()
    table = numpy_helper.to_array(model.graph.initializer[0])
    hidden = np.zeros((2, HIDDEN), dtype=np.float32)
    hidden[:, 0] = 300.0 / np.abs(table[:, 0]).max()
    labels = np.array([int(np.argmin(table[:, 0])), int(np.argmax(table[:, 0]))], dtype=np.int64)
    feeds = {"hidden": hidden, "labels": labels}
    expected = float(_session(model).run(None, feeds)[0])
    assert np.isfinite(expected) and expected > 100
    assert _session(_rewritten(model, 4)).run(None, feeds)[0] == pytest.approx(expected, rel=1e-5)


def test_log_probabilities_read_elsewhere_keep_the_fused_op():
    model = _head_and_loss()
    model.graph.output.append(helper.make_tensor_value_info("log_prob", TensorProto.FLOAT, None))
    model.graph.node.append(helper.make_node("Identity", ["log_prob"], ["log_prob_copy"]))
    assert not ChunkedCrossEntropy(4).call(model).modified
    with pytest.raises(ValueError):
        ChunkedCrossEntropy(0)
    with pytest.raises(ValueError):
        ChunkedCrossEntropy(4, min_rows=0)


@pytest.mark.parametrize("rows, sizes", [(3, [3, 0, 0, 0]), (7, [5, 2, 0, 0]), (12, [5, 5, 2, 0]), (40, [10, 10, 10, 10])])
def test_slices_hold_at_least_min_rows_and_give_the_same_loss(rows, sizes):
    """Few labelled rows go in fewer, larger slices (faster LM-head products); many rows still in `chunks` slices."""
    from ortft.graph.chunked_cross_entropy import CHUNKED_LOSS_PREFIX

    model = _head_and_loss()
    chunked = _rewritten(model, chunks=4, min_rows=5)
    slice_logits = [f"{CHUNKED_LOSS_PREFIX}0/chunk{i}_logits" for i in range(4)]
    chunked.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in slice_logits)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, VOCAB, rows).astype(np.int64)
    labels[0] = -100
    feeds = {"hidden": (rng.standard_normal((rows, HIDDEN)) * 4).astype(np.float32), "labels": labels}
    loss, *logits = _session(chunked).run(None, feeds)
    assert [part.shape[0] for part in logits] == sizes
    assert loss == pytest.approx(float(_session(model).run(None, feeds)[0]), rel=2e-6)


def test_a_bundle_with_the_chunked_loss_trains_like_one_with_the_fused_op(tiny_llama, tmp_path):
    """Same losses (training and evaluation) and the same adapter weights after three AdamW steps."""
    from ortft.runtime import TrainingSession

    from helpers.bundles import prepare_tiny
    from helpers.reference import assert_trains_alike, batch_for

    fused = prepare_tiny(tiny_llama, tmp_path / "fused", loss_chunks=0)
    chunked = prepare_tiny(tiny_llama, tmp_path / "chunked", loss_chunks=3, loss_chunk_rows=1)  # three real slices
    assert fused["graph_patches"]["loss_chunks"] == 0 and chunked["graph_patches"]["loss_chunks"] == 3
    assert chunked["graph_patches"]["loss_chunk_rows"] == 1
    for name, expected in (("fused", 1), ("chunked", 0)):
        for graph in ("training_model.onnx", "eval_model.onnx"):
            nodes = onnx.load(str(tmp_path / name / graph), load_external_data=False).graph.node
            assert [node.op_type for node in nodes].count("SoftmaxCrossEntropyLoss") == expected
            head_slices = [node for node in nodes if node.op_type in ("Gemm", "MatMul") and node.name.endswith("_logits")]
            assert len(head_slices) == (0 if expected else 3)  # the LM head runs per slice
    batch = batch_for(fused)
    sessions = [TrainingSession(tmp_path / name, threads=1) for name in ("fused", "chunked")]
    assert_trains_alike(sessions, batch, steps=3, rel=1e-5, rtol=1e-4, atol=1e-6)
    evaluated = [float(np.asarray(session.evaluate(batch))) for session in sessions]
    assert evaluated[1] == pytest.approx(evaluated[0], rel=1e-5)
    few = {name: value.copy() for name, value in batch.items()}
    few["labels"][:] = -100
    few["labels"][0, 5:7] = batch["input_ids"][0, 5:7]  # two counted positions: one slice stays empty
    assert_trains_alike(sessions, few, steps=1, rel=1e-5, rtol=1e-4, atol=1e-6)


def test_cli_flags_reach_the_manifest_and_bad_values_exit_2(tiny_llama, tmp_path):
    import json
    import subprocess
    import sys

    def prepare(*flags):
        return subprocess.run([sys.executable, "-m", "ortft", "prepare", str(tiny_llama), "--out", str(tmp_path / "b"),
                               "--rank", "4", *flags], capture_output=True, text=True)

    refused = prepare("--loss-chunk-rows", "0")
    assert refused.returncode == 2 and "--loss-chunk-rows" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "b").exists()
    made = prepare("--loss-chunks", "3", "--loss-chunk-rows", "2")
    assert made.returncode == 0, made.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["graph_patches"]["loss_chunks"] == 3 and manifest["graph_patches"]["loss_chunk_rows"] == 2
    assert manifest["prepare"]["config"]["loss_chunk_rows"] == 2
