"""`ortft predict` (ortft/predict.py): labels and entities from a run folder or a merged export, read with the
training data's word alignment; output lines, truncation, and clean errors.

Tiny random models cannot tag anything real, so the entity tests feed predict known logits: the tags
training would learn for a line (from ortft.data) at each word's first sub-token, another tag elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.reference import randomize_adapters
from helpers.data import write_jsonl
from helpers.runs import make_run
from helpers.bundles import tiny_bundle
from helpers.cli import ok, run_ortft, user_error

from ortft.data import IGNORE_INDEX, DataConfig, load_dataset
from ortft.errors import ConfigError, DataError
from ortft.export import export_run
from ortft.manifest import read_manifest
from ortft.predict import Classifier, open_classifier, predict_records
from ortft.runtime import TrainingSession

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _run(tmp_path_factory, model_dir: Path, name: str, **settings) -> Path:
    bundle = tiny_bundle(tmp_path_factory, model_dir, name, **settings)
    session = TrainingSession(bundle, threads=1)
    adapter = randomize_adapters(session, read_manifest(bundle))
    return make_run(tmp_path_factory.mktemp(name) / "run", SimpleNamespace(bundle_dir=bundle, adapter=adapter))


@pytest.fixture(scope="module")
def ner_run(tiny_model_factory, tmp_path_factory) -> Path:
    return _run(tmp_path_factory, tiny_model_factory("bert", "seq-cls"), "predict-bert-token-cls", task="token-cls", labels=NER_LABELS)


@pytest.fixture(scope="module")
def ner_export(ner_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ner-export") / "export"
    export_run(ner_run, out)
    return out


@pytest.fixture(scope="module")
def cls_run(tiny_model_factory, tmp_path_factory) -> Path:
    return _run(tmp_path_factory, tiny_model_factory("llama", "seq-cls"), "predict-llama-seq-cls", task="seq-cls",
                labels=["negative", "positive"])


def feed_training_tags(classifier: Classifier, labelled_file: Path) -> None:
    """Make `classifier.logits` return, for each line of `labelled_file`, one-hot logits of the tags training
    learns at each word's first sub-token, and B-LOC at every other position."""
    config = DataConfig(seq_len=512, batch_size=1, seed=0, task="token-cls", label_names=NER_LABELS)
    examples = load_dataset(labelled_file, classifier.tokenizer, config).examples
    by_ids = {tuple(example.input_ids): example.labels for example in examples}
    elsewhere = NER_LABELS.index("B-LOC")

    def logits(rows):
        out = np.zeros((len(rows), max(len(row) for row in rows), len(NER_LABELS)), dtype=np.float32)
        for index, row in enumerate(rows):
            for position, label in enumerate(by_ids[tuple(row)]):
                out[index, position, label if label != IGNORE_INDEX else elsewhere] = 20.0
        return out

    classifier.logits = logits


def test_tokens_input_gets_the_tags_training_learns(ner_run, tmp_path):
    gold = [{"tokens": ["Ada", "Lovelace", "visited", "New", "Oslo", "."], "tags": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"], "id": 7},
            {"tokens": ["Nobody", "came"], "tags": ["O", "O"]}]
    path = write_jsonl(tmp_path / "gold.jsonl", gold)
    classifier = open_classifier(ner_run)
    feed_training_tags(classifier, path)
    results = list(predict_records(classifier, path, batch_size=2))
    assert [result["tags"] for result in results] == [record["tags"] for record in gold]
    assert results[0]["id"] == 7 and results[0]["text"] == "Ada Lovelace visited New Oslo ."
    assert results[0]["entities"] == [
        {"start": 0, "end": 12, "label": "PER", "text": "Ada Lovelace", "score": pytest.approx(1.0, abs=1e-3)},
        {"start": 21, "end": 29, "label": "LOC", "text": "New Oslo", "score": pytest.approx(1.0, abs=1e-3)},
    ]
    assert results[1]["entities"] == []


def test_text_input_gets_entities_as_character_spans(ner_export, tmp_path):
    text = "Dr. Ada Lovelace-Byron flew to (New Oslo), twice."
    entities = [{"start": 4, "end": 22, "label": "PER"}, {"start": 32, "end": 40, "label": "LOC"}]
    labelled = write_jsonl(tmp_path / "labelled.jsonl", [{"text": text, "entities": entities}])
    unlabelled = write_jsonl(tmp_path / "in.jsonl", [{"text": text, "entities": entities}])  # a gold field is dropped
    classifier = open_classifier(ner_export)
    feed_training_tags(classifier, labelled)
    [result] = predict_records(classifier, unlabelled)
    assert [(e["start"], e["end"], e["label"], e["text"]) for e in result["entities"]] == [
        (4, 22, "PER", "Ada Lovelace-Byron"), (32, 40, "LOC", "New Oslo")]
    assert set(result) == {"text", "entities"}


def test_run_folder_and_its_export_predict_alike(ner_run, ner_export, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "Ada met Bo in Oslo."}, {"tokens": ["hello", "world"]}])
    from_run = list(predict_records(open_classifier(ner_run), path))
    from_export = list(predict_records(open_classifier(ner_export), path))
    assert from_run == from_export
    classifier = open_classifier(ner_export)
    raw = classifier.logits([classifier.tokenizer.encode("hello world")])[0]
    assert raw.shape == (len(classifier.tokenizer.encode("hello world")), len(NER_LABELS))


def test_long_text_is_cut_and_marked(ner_export, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"tokens": ["word"] * 30}, {"tokens": ["short"]}])
    results = list(predict_records(open_classifier(ner_export), path, seq_len=8))
    assert results[0]["truncated"] is True and len(results[0]["tags"]) == 30
    assert results[0]["tags"][7:] == ["O"] * 23  # words past the cut are tagged O
    assert "truncated" not in results[1]


def test_seq_cls_gives_the_most_likely_label_and_its_probability(cls_run, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a fine film", "label": "positive", "id": "r1"}, {"text": "dull"}])
    classifier = open_classifier(cls_run, checkpoint="latest")
    results = list(predict_records(classifier, path))
    for result, text in zip(results, ["a fine film", "dull"]):
        logits = classifier.logits([classifier.tokenizer.encode(text)])[0].astype(np.float64)
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert result["label"] == ["negative", "positive"][int(probabilities.argmax())]
        assert result["score"] == pytest.approx(float(probabilities.max()), rel=1e-5)
    assert results[0]["id"] == "r1" and set(results[1]) == {"text", "label", "score"}


def test_bad_lines_and_models_are_user_errors(ner_export, tmp_path):
    classifier = open_classifier(ner_export)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"sentence": "no text"}])
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: no field 'text' or 'tokens'"):
        list(predict_records(classifier, bad))
    bad.write_text('{"tokens": ["a", ""]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: token 1 is empty"):
        list(predict_records(classifier, bad))
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "manifest.json").write_text(json.dumps({"format": "ortft-export", "kind": "merged-onnx", "task": "causal-lm", "files": {}}))
    with pytest.raises(ConfigError, match="use `ortft generate`"):
        Classifier(causal)


def test_generate_points_a_classifier_to_predict(ner_export):
    from ortft.generate import describe_model_folder

    with pytest.raises(ConfigError, match="holds a token-cls classifier") as caught:
        describe_model_folder(ner_export)
    assert "ortft predict" in caught.value.hint


def test_command_line(ner_run, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "Ada met Bo."}, {"text": "Oslo"}])
    out = tmp_path / "predictions.jsonl"
    result = ok(run_ortft("predict", ner_run, "--data", data, "--out", out, "--threads", "1"))
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["text"] for line in lines] == ["Ada met Bo.", "Oslo"] and all("entities" in line for line in lines)
    assert "2 lines (token-cls)" in result.stderr and result.stdout == ""
    user_error(run_ortft("predict", ner_run, "--data", data, "--out", out), "exists", "--force")
    stdout = ok(run_ortft("predict", ner_run, "--data", data, "--threads", "1")).stdout
    assert [json.loads(line) for line in stdout.splitlines()] == lines
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": 3}])
    user_error(run_ortft("predict", ner_run, "--data", bad), f"{bad}, line 2", "must be a string")
