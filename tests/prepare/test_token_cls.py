"""prepare --task token-cls: every causal architecture's *ForTokenClassification matches PyTorch+PEFT, and the
label names are checked (IOB2 tags, or --num-labels)."""

from __future__ import annotations

import numpy as np
import pytest

from ortft.errors import ConfigError
from ortft.runtime import TrainingSession

from helpers.bundles import prepare_tiny
from helpers.reference import batch_for, randomize_adapters, torch_loss, torch_peft_model

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "phi3", "gemma"])
def test_causal_architectures_match_pytorch_peft(tiny_model_factory, tmp_path, model_type):
    model_dir = tiny_model_factory(model_type)
    manifest = prepare_tiny(model_dir, tmp_path / "bundle", task="token-cls", labels=NER_LABELS)
    assert manifest["adapter"]["task_type"] == "TOKEN_CLS"
    assert any(entry["role"] == "full" and ".score." in entry["name"] for entry in manifest["trainable"])  # the head
    session = TrainingSession(tmp_path / "bundle", threads=1)
    values = randomize_adapters(session, manifest)
    batch = batch_for(manifest)
    loss = float(np.asarray(session.evaluate(batch)[0]))
    reference = torch_loss(torch_peft_model(manifest, model_dir, values), batch)
    assert abs(loss - reference) <= 1e-4 * abs(reference), (loss, reference)
    assert np.isfinite(float(np.asarray(session.train_step_forward_backward(batch)[0])))
    assert all(np.isfinite(value).all() for value in session.gradients().values())


@pytest.mark.parametrize("labels,message", [
    (["O", "PER", "LOC"], "PER, LOC are not IOB2 tags"),
    (["B-PER", "I-PER"], "there is no O tag"),
    (["O", "B-"], "B- is not an IOB2 tag"),
])
def test_labels_must_be_iob2_tags(tiny_llama, tmp_path, labels, message):
    with pytest.raises(ConfigError, match=message):
        prepare_tiny(tiny_llama, tmp_path / "bundle", task="token-cls", labels=labels)
    assert not (tmp_path / "bundle").exists()


def test_num_labels_names_label_ids(tiny_model_factory, tmp_path):
    manifest = prepare_tiny(tiny_model_factory("bert", "seq-cls"), tmp_path / "bundle", task="token-cls", num_labels=3)
    assert manifest["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert manifest["graph"]["outputs"][1]["shape"] == ["batch", "sequence", 3]
    with pytest.raises(ConfigError, match="--task token-cls needs --num-labels N"):
        prepare_tiny(tiny_model_factory("bert", "seq-cls"), tmp_path / "other", task="token-cls")
