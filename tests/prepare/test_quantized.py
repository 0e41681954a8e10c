"""QLoRA-style bundles (--quantize int8/int4) on a tiny Llama: errors reported, eval close to float32, training works."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ortft.commands.info import summary_lines
from ortft.runtime import TrainingSession

from helpers.bundles import prepare_tiny
from helpers.quantized import with_q8_0_embeddings
from helpers.reference import batch_for, onnx_logits


def _loss(outputs) -> float:
    return float(np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs))


@pytest.fixture(scope="module")
def float_loss(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "b"
    manifest = prepare_tiny(tiny_llama, out)
    return _loss(TrainingSession(out, threads=1).evaluate(batch_for(manifest)))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_bundle_reports_errors_evaluates_close_and_trains(tiny_llama, tmp_path, float_loss, scheme):
    manifest = prepare_tiny(tiny_llama, tmp_path / "b", quantize=scheme)
    section = manifest["quantization"]
    assert section["scheme"] == scheme and len(section["layers"]) == 14  # 7 adapted linears x 2 layers
    assert all(name.endswith(".base_layer.weight") for name in section["layers"])
    assert all(name not in manifest["frozen"] for name in section["layers"])  # not in the checkpoint
    assert section["frozen_bytes_after"] < section["frozen_bytes_before"]
    bound = 0.01 if scheme == "int8" else 1 / 14 + 1e-6
    assert all(layer["max_rel_error"] < bound for layer in section["layers"].values())
    assert section["recomputed_for_backward"] > 0
    assert manifest["graph_patches"]["loss_chunk_rows"] == 1  # quantized: even loss slices, the least memory
    training = onnx.load(str(tmp_path / "b" / "training_model.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in training.graph.node) == 14 + section["recomputed_for_backward"]
    assert any(line.startswith("frozen bytes") for line in summary_lines(manifest))

    session = TrainingSession(tmp_path / "b", threads=1)
    batch = batch_for(manifest)
    initial = _loss(session.evaluate(batch))
    assert abs(initial - float_loss) < (0.01 if scheme == "int8" else 0.05) * float_loss
    session.release_idle_memory()  # drops the mapped quantized weights' pages; they read back unchanged
    assert _loss(session.evaluate(batch)) == initial
    for _ in range(8):
        session.train_step_forward_backward(batch)
        session.optimizer_step(5e-3)
    assert _loss(session.evaluate(batch)) < initial - 0.05


def test_tied_lm_head_is_read_without_transpose_and_can_be_quantized(tiny_model_factory, tmp_path):
    """A head tied to the embedding table becomes Gemm(transB=1) on the table, so int4 can cover it too."""
    tied = tiny_model_factory("llama", tie_word_embeddings=True)
    float_manifest = prepare_tiny(tied, tmp_path / "fp32")
    table = next(name for name in float_manifest["frozen"] if name.endswith("embed_tokens.weight"))
    graph = onnx.load(str(tmp_path / "fp32" / "training_model.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "Transpose" and table in n.input]
    assert any(n.op_type == "Gemm" and table in n.input for n in graph.node)
    batch = batch_for(float_manifest)
    float_loss = _loss(TrainingSession(tmp_path / "fp32", threads=1).evaluate(batch))

    manifest = prepare_tiny(tied, tmp_path / "int4", quantize="int4", quantize_embeddings=True)
    section = manifest["quantization"]
    assert table in section["layers"] and table not in manifest["frozen"]
    assert section.get("skipped", {}) == {}
    session = TrainingSession(tmp_path / "int4", threads=1)
    initial = _loss(session.evaluate(batch))
    assert abs(initial - float_loss) < 0.05 * float_loss
    for _ in range(8):
        session.train_step_forward_backward(batch)
        session.optimizer_step(5e-3)
    assert _loss(session.evaluate(batch)) < initial - 0.05


def test_a_large_lm_head_is_dequantized_in_parts_and_trains_the_same(tiny_llama, tmp_path, monkeypatch):
    """The untied head [64, 320] over two parts' size is split in 5 column parts; losses do not change."""
    import ortft.graph.quantize_weights as quantize_weights

    whole = prepare_tiny(tiny_llama, tmp_path / "whole", quantize="int4", quantize_embeddings=True)
    monkeypatch.setattr(quantize_weights, "PART_ELEMENTS", 5000)  # MLP weights (8192 values) stay whole
    split = prepare_tiny(tiny_llama, tmp_path / "split", quantize="int4", quantize_embeddings=True)
    head = next(name for name in split["quantization"]["layers"] if name.endswith("lm_head.weight"))
    assert split["quantization"]["layers"][head]["parts"] == 5 and whole["quantization"]["layers"][head]["parts"] == 1
    assert [layer["parts"] for name, layer in split["quantization"]["layers"].items() if name != head] == \
        [1] * (len(split["quantization"]["layers"]) - 1)
    # Each part gets its own backward DequantizeLinear.
    assert split["quantization"]["recomputed_for_backward"] == whole["quantization"]["recomputed_for_backward"] + 4
    batch = batch_for(whole)
    sessions = [TrainingSession(tmp_path / name, threads=1) for name in ("whole", "split")]
    for _ in range(3):
        losses = [_loss(session.train_step_forward_backward(batch)) for session in sessions]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        for session in sessions:
            session.optimizer_step(5e-3)
    assert _loss(sessions[1].evaluate(batch)) == pytest.approx(_loss(sessions[0].evaluate(batch)), rel=1e-5)


def test_quantized_bundles_run_at_level_1_without_arena_float_bundles_with_it(tiny_llama, tmp_path, monkeypatch):
    """The session settings runtime.py documents: no planned buffer reuse; QLoRA sessions keep
    DequantizeLinear separate and run without arena."""
    from ortft import runtime

    ort = runtime.onnxruntime_module()
    seen = []
    real_options = TrainingSession._options

    def spy(self):
        options = real_options(self)
        seen.append(options)
        return options

    monkeypatch.setattr(TrainingSession, "_options", spy)
    prepare_tiny(tiny_llama, tmp_path / "fp32")
    prepare_tiny(tiny_llama, tmp_path / "int4", quantize="int4")
    TrainingSession(tmp_path / "fp32", threads=1).train_session
    TrainingSession(tmp_path / "int4", threads=1).train_session
    float_options, quantized_options = seen
    assert float_options.enable_cpu_mem_arena and float_options.get_session_config_entry("session.use_env_allocators") == "1"
    assert float_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert not float_options.enable_mem_reuse and not quantized_options.enable_mem_reuse
    assert not quantized_options.enable_cpu_mem_arena
    assert quantized_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for options in seen:  # stock onnxruntime's defaults that cost memory in a training graph
        assert not options.enable_mem_pattern and options.get_session_config_entry("session.disable_prepacking") == "1"


def _without_exact_embeddings(monkeypatch):
    from ortft.prepare import graph_stages

    monkeypatch.setattr(graph_stages, "exact_targets", lambda model, trainable, settings: [])


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_an_exactly_int8_embedding_table_is_stored_as_int8_and_trains_bit_for_bit(tiny_model_factory, tmp_path, monkeypatch, scheme):
    """A tied table that is int8 x a per-32 scale (SmolLM2's GGUF) is stored as int8: the same losses and gradients."""
    source = with_q8_0_embeddings(tiny_model_factory("llama", tie_word_embeddings=True), tmp_path / "q8")
    exact = prepare_tiny(source, tmp_path / "exact", quantize=scheme)
    with monkeypatch.context() as patch:
        _without_exact_embeddings(patch)
        old = prepare_tiny(source, tmp_path / "old", quantize=scheme)
    assert exact["quantization"]["opset"] == 21
    table = next(name for name in old["frozen"] if name.endswith("embed_tokens.weight"))
    section = exact["quantization"]
    assert section["embeddings"] == "int8-exact" and old["quantization"]["embeddings"] is False
    assert section["layers"][table]["scheme"] == "int8-exact" and section["layers"][table]["max_abs_error"] == 0.0
    assert table not in exact["frozen"] and len(section["layers"]) == len(old["quantization"]["layers"]) + 1
    table_bytes = section["layers"][table]["bytes_before"]
    assert section["layers"][table]["bytes_after"] == table_bytes // 4 + table_bytes // 32  # int8 + a float32 per 32
    weight_files = ("frozen_weights.data", "quantized_weights.data")  # the graphs: the opset 21 conversion (int8) adds a little
    sizes = {name: sum(manifest["files"][file]["bytes"] for file in weight_files) for name, manifest in (("exact", exact), ("old", old))}
    assert sizes["old"] - sizes["exact"] > 0.6 * table_bytes
    training = onnx.load(str(tmp_path / "exact" / "training_model.onnx"), load_external_data=False).graph
    blocked = [n for n in training.node if n.op_type == "DequantizeLinear" and table in n.name]
    assert blocked and all({a.name: a.i for a in n.attribute}.get("block_size") == 32 for n in blocked)

    batch = batch_for(old)
    sessions = [TrainingSession(tmp_path / name, threads=1) for name in ("old", "exact")]
    assert _loss(sessions[1].evaluate(batch)) == _loss(sessions[0].evaluate(batch))
    for _ in range(3):
        losses = [_loss(session.train_step_forward_backward(batch)) for session in sessions]
        assert abs(losses[1] - losses[0]) <= 1e-7
        gradients = [session.gradients() for session in sessions]
        assert gradients[0].keys() == gradients[1].keys()
        for name, gradient in gradients[0].items():
            np.testing.assert_allclose(gradients[1][name], gradient, rtol=0, atol=1e-7, err_msg=name)
        for session in sessions:
            session.optimizer_step(5e-3)
    assert _loss(sessions[1].evaluate(batch)) == pytest.approx(_loss(sessions[0].evaluate(batch)), rel=0, abs=1e-7)

    # The inference template (generate, exports) reads the same table: the same weights and logits.
    from ortft.inference_template import InferenceTemplate

    hf_names = list(old["inference"]["weights"])
    weights = [InferenceTemplate(tmp_path / name, manifest).read_weights(hf_names) for name, manifest in (("old", old), ("exact", exact))]
    for name in hf_names:
        assert np.array_equal(weights[1][name], weights[0][name]), name
    input_ids = batch["input_ids"][:1]
    logits = [onnx_logits(tmp_path / name / "inference_model.onnx", input_ids, {"session.qdq_matmulnbits_accuracy_level": "1"})
              for name in ("old", "exact")]
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-6)


def test_a_float_embedding_table_leaves_the_quantized_bundle_unchanged(tiny_model_factory, tmp_path, monkeypatch):
    tied = tiny_model_factory("llama", tie_word_embeddings=True)
    manifest = prepare_tiny(tied, tmp_path / "new", quantize="int4")
    with monkeypatch.context() as patch:
        _without_exact_embeddings(patch)
        old = prepare_tiny(tied, tmp_path / "old", quantize="int4")
    assert manifest["quantization"]["embeddings"] is False
    assert any(name.endswith("embed_tokens.weight") for name in manifest["frozen"])
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == \
        {name: entry["sha256"] for name, entry in old["files"].items()}
