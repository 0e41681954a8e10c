"""Tests of ortft/prepare/shared_weights.py: the inference template reads the training graphs' weight files, so a bundle
holds each weight once; it still computes the base model (QLoRA: the dequantized base), and every export made from it
computes what PyTorch + PEFT compute on that base. Tiny random models, prepared in-process."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers.reference import onnx_logits

from ortft.export import export_merged_onnx
from ortft.export_adapter_onnx import export_onnx_adapter
from ortft.export_gguf import export_gguf
from ortft.inference_template import DEQUANTIZE_SESSION_CONFIG
from ortft.manifest import load_verified
from ortft.bundle import FROZEN_DATA, QUANTIZED_DATA

from helpers.bundles import prepare_tiny
from helpers.reference import template_base_model, torch_peft_model


def _input_ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 320, size=(2, 9)).astype(np.int64)


def _adapter(manifest: dict, seed: int = 3) -> dict[str, np.ndarray]:
    """A trained-looking adapter: every LoRA B non-zero."""
    rng = np.random.default_rng(seed)
    return {entry["name"]: (rng.standard_normal(entry["shape"]) * 0.1).astype(np.float32) for entry in manifest["trainable"]}


def _torch_on_template_base(manifest: dict, model_dir, bundle_dir, adapter=None):
    """PyTorch + PEFT with the base weights the template holds (for QLoRA bundles: dequantized)."""
    return torch_peft_model(manifest, model_dir, adapter, base_model=template_base_model(manifest, model_dir, bundle_dir))


def _torch_logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(input_ids)).logits.numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_a_float_bundle_holds_each_weight_once(tiny_model_factory, tmp_path, tied):
    model_dir = tiny_model_factory("llama", tie_word_embeddings=tied)
    bundle = tmp_path / "bundle"
    manifest = prepare_tiny(model_dir, bundle)
    section = manifest["inference"]
    assert section["model"] == "inference_model.onnx" and load_verified(bundle)["files"] == manifest["files"]
    assert {"inference/model.onnx", "inference/model.onnx.data", "inference_model.onnx.data"}.isdisjoint(manifest["files"])
    assert section["shared_weights"] == {FROZEN_DATA: 20 if tied else 21, QUANTIZED_DATA: 0, "inference_model.onnx.data": 0}
    assert all(record["file"] == FROZEN_DATA and record["tensor"] in manifest["frozen"] for record in section["parameters"].values())
    # pretransposed frozen weights are read as stored ([in, out]); the tied table as it is (the head transposes it)
    q_proj = section["parameters"]["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj["layout"] == "in_out" and section["weights"]["model.layers.0.self_attn.q_proj.weight"]["layout"] == "in_out"
    assert section["parameters"]["model.embed_tokens.weight"]["layout"] == "out_in"
    if tied:
        assert section["weights"]["lm_head.weight"]["initializer"] == "model.embed_tokens.weight"
    # the template is a graph without weights (all in frozen_weights.data)
    assert manifest["files"]["inference_model.onnx"]["bytes"] < 0.25 * manifest["files"][FROZEN_DATA]["bytes"]
    graph = onnx.load(str(bundle / "inference_model.onnx"), load_external_data=False).graph
    assert {entry.value for t in graph.initializer for entry in t.external_data if entry.key == "location"} == {FROZEN_DATA}
    input_ids = _input_ids()
    np.testing.assert_allclose(onnx_logits(bundle / "inference_model.onnx", input_ids),
                               _torch_logits(torch_peft_model(manifest, model_dir, None), input_ids), atol=1e-4, rtol=0)


def test_exports_from_a_shared_template_compute_the_fine_tune(tiny_model_factory, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_factory("llama")
    bundle = tmp_path / "bundle"
    manifest = prepare_tiny(model_dir, bundle)
    adapter = _adapter(manifest)
    expected = _torch_logits(torch_peft_model(manifest, model_dir, adapter), _input_ids())
    export_merged_onnx(bundle, manifest, adapter, tmp_path / "merged")
    np.testing.assert_allclose(onnx_logits(tmp_path / "merged" / "model.onnx", _input_ids()), expected, atol=1e-4, rtol=0)
    export_onnx_adapter(bundle, manifest, adapter, tmp_path / "served", "tuned")
    from helpers.reference import onnx_adapter_logits

    np.testing.assert_allclose(onnx_adapter_logits(tmp_path / "served", "tuned", _input_ids()), expected, atol=1e-4, rtol=0)
    export_gguf(bundle, manifest, adapter, tmp_path / "gguf", "f32")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gguf"), gguf_file="model.gguf").eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(_input_ids())).logits.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-embeddings-in-parts"])
def test_a_quantized_bundle_template_runs_the_dequantized_base(tiny_model_factory, tmp_path, monkeypatch, scheme):
    from ortft.graph import quantize_weights

    model_dir = tiny_model_factory("llama")
    bundle = tmp_path / "bundle"
    settings = {"quantize": scheme[:4]}
    if scheme == "int4-embeddings-in-parts":
        settings["quantize_embeddings"] = True
        monkeypatch.setattr(quantize_weights, "PART_ELEMENTS", 5000)  # the untied head [64, 320]: 5 column parts
    manifest = prepare_tiny(model_dir, bundle, **settings)
    section = manifest["inference"]
    quantized = {name for name, record in section["parameters"].items() if record.get("dequantize")}
    assert len(quantized) == len(manifest["quantization"]["layers"]) and section["shared_weights"][QUANTIZED_DATA] == len(quantized)
    assert all(section["parameters"][name]["file"] == QUANTIZED_DATA for name in quantized)
    if scheme == "int4-embeddings-in-parts":
        assert len(section["parameters"]["lm_head.weight"]["dequantize"]) == 5
    assert not [rel for rel in manifest["files"] if rel.startswith("inference/model")]
    input_ids = _input_ids()
    base = _torch_logits(_torch_on_template_base(manifest, model_dir, bundle), input_ids)
    np.testing.assert_allclose(onnx_logits(bundle / "inference_model.onnx", input_ids, DEQUANTIZE_SESSION_CONFIG), base, atol=1e-4, rtol=0)
    # merged exports fold the adapter into the dequantized base (float32); onnx-adapter keeps the base quantized
    adapter = _adapter(manifest)
    expected = _torch_logits(_torch_on_template_base(manifest, model_dir, bundle, adapter), input_ids)
    export_merged_onnx(bundle, manifest, adapter, tmp_path / "merged")
    np.testing.assert_allclose(onnx_logits(tmp_path / "merged" / "model.onnx", input_ids), expected, atol=1e-4, rtol=0)
    written = export_onnx_adapter(bundle, manifest, adapter, tmp_path / "served", "tuned")
    assert written["session_config"] == DEQUANTIZE_SESSION_CONFIG
    genai = json.loads((tmp_path / "served" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["session.qdq_matmulnbits_accuracy_level"] == "1"
    served_bytes = (tmp_path / "served" / "model.onnx.data").stat().st_size
    assert served_bytes < 0.75 * (tmp_path / "merged" / "model.onnx.data").stat().st_size
    from ortft.config import SamplingSettings
    from ortft.generate import Generator

    greedy = SamplingSettings(max_new_tokens=8, temperature=0)
    assert Generator(tmp_path / "served", threads=1, adapter="tuned").generate_ids([1, 17, 42], greedy) == \
        Generator(tmp_path / "merged", threads=1).generate_ids([1, 17, 42], greedy)
    assert Generator(bundle, threads=1).folder.session_config == DEQUANTIZE_SESSION_CONFIG


def test_a_weight_without_a_stored_twin_keeps_its_own_copy(tiny_model_factory, tmp_path, monkeypatch):
    from ortft.manifest import write_manifest
    from ortft.prepare import shared_weights

    model_dir = tiny_model_factory("llama")
    bundle = tmp_path / "bundle"
    monkeypatch.setattr(shared_weights, "share_template_weights", lambda bundle_dir, section, trainable: section)
    manifest = prepare_tiny(model_dir, bundle)
    monkeypatch.undo()
    assert manifest["inference"]["model"] == "inference/model.onnx"
    original = shutil.copytree(bundle, tmp_path / "original")
    # the training graphs' copy of one norm differs from the template's: it cannot be shared
    eval_graph = onnx.load(str(bundle / "eval_model.onnx"), load_external_data=False).graph
    norm = next(t for t in eval_graph.initializer if t.name.endswith("layers.1.input_layernorm.weight"))
    offset = int({entry.key: entry.value for entry in norm.external_data}["offset"])
    with open(bundle / FROZEN_DATA, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.full(4, 7.0, np.float32).tobytes())
    section = shared_weights.share_template_weights(bundle, manifest["inference"], manifest["trainable"])
    manifest = write_manifest(bundle, {**manifest, "inference": section})
    record = section["parameters"]["model.layers.1.input_layernorm.weight"]
    assert record["file"] == "inference_model.onnx.data" and record["tensor"] is None
    assert section["shared_weights"] == {FROZEN_DATA: 20, QUANTIZED_DATA: 0, "inference_model.onnx.data": 1}
    input_ids = _input_ids()
    np.testing.assert_allclose(onnx_logits(bundle / "inference_model.onnx", input_ids),
                               onnx_logits(original / "inference" / "model.onnx", input_ids), atol=1e-5, rtol=0)
