"""The bundle's names and typed manifest view (ortft/bundle.py), as the manifest reader and writer hand it out."""

from __future__ import annotations

import json

import pytest

from ortft.bundle import GRAPH_FILES, MANIFEST_NAME, TRAINING_API_CHECKPOINT, TRAINING_API_FILES, BundleManifest
from ortft.manifest import read_manifest, write_manifest

MANIFEST = {
    "format": "ortft-bundle", "format_version": 2, "task": "seq-cls", "labels": ["neg", "pos"],
    "model": {"vocab_size": 320, "max_seq_len": 128, "num_layers": 2},
    "adapter": {"rank": 4, "alpha": 8, "scale": 2.0},
    "optimizer": {"weight_decay": 0.0, "update": "torch.optim.AdamW"},
    "trainable": [{"name": "a.lora_A", "shape": [4, 16]}, {"name": "a.lora_B", "shape": [16, 4]}],
    "tokenizer": {"dir": "tokenizer"},
    "graph": {"inputs": [{"name": "input_ids"}], "outputs": [{"name": "loss"}]},
    "source": {"gguf_file": "model.gguf"},
}


def test_properties_read_the_manifest_keys():
    manifest = BundleManifest(MANIFEST)
    assert manifest.task == "seq-cls" and manifest.is_classifier and manifest.labels == ["neg", "pos"]
    assert manifest.max_seq_len == 128 and manifest.vocab_size == 320 and manifest.format_version == 2
    assert manifest.trainable_names == ["a.lora_A", "a.lora_B"]
    assert manifest.trainable_shapes == {"a.lora_A": [4, 16], "a.lora_B": [16, 4]}
    assert manifest.adapter["scale"] == 2.0 and manifest.optimizer["update"] == "torch.optim.AdamW"
    assert manifest.tokenizer_dir == "tokenizer" and manifest.tokenizer_path("/b").as_posix() == "/b/tokenizer"
    assert manifest.graph_inputs == [{"name": "input_ids"}] and manifest.graph_outputs == [{"name": "loss"}]
    assert manifest.source["gguf_file"] == "model.gguf"


def test_optional_sections_read_as_empty_and_rare_keys_stay_dict_items():
    manifest = BundleManifest({"task": "causal-lm", "trainable": [], "tokenizer": {"dir": "tok"}, "created": "today"})
    assert not manifest.is_classifier and manifest.labels is None and manifest.quantization is None
    assert manifest.adapter == {} and manifest.optimizer == {} and manifest.source == {} and manifest.files == {}
    assert manifest.inference is None and manifest.graph_inputs == [] and manifest.format_version == 0
    assert manifest["created"] == "today" and json.loads(json.dumps(manifest))["created"] == "today"
    with pytest.raises(KeyError):
        manifest.max_seq_len  # noqa: B018  (a required key that is missing fails loudly)


def test_of_wraps_a_dict_once():
    manifest = BundleManifest.of(MANIFEST)
    assert isinstance(manifest, BundleManifest) and manifest == MANIFEST
    assert BundleManifest.of(manifest) is manifest


def test_write_and_read_manifest_hand_out_the_view(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}", encoding="utf-8")
    written = write_manifest(tmp_path, MANIFEST)
    assert isinstance(written, BundleManifest) and written.files["tokenizer/tokenizer.json"]["bytes"] == 2
    read = read_manifest(tmp_path)
    assert isinstance(read, BundleManifest) and read.trainable_names == ["a.lora_A", "a.lora_B"]
    assert (tmp_path / MANIFEST_NAME).is_file()


def test_file_names():
    assert GRAPH_FILES == ("training_model.onnx", "eval_model.onnx")
    assert TRAINING_API_CHECKPOINT in TRAINING_API_FILES and "optimizer_model.onnx" in TRAINING_API_FILES
