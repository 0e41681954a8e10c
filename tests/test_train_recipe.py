"""`ortft.train.train` as a recipe: settings checked once, data facts said once, progress through the reporter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ortft.config import TrainConfig
from ortft.errors import ConfigError
from ortft.progress import TrainReporter
from ortft.train import train
from helpers.bundles import tiny_bundle
from helpers.cli import ok, run_ortft
from helpers.data import write_text_data


class RecordingReporter(TrainReporter):
    """Keeps every call, in order."""

    def __init__(self):
        self.calls: list[tuple] = []

    def note(self, text):
        self.calls.append(("note", text))

    def message(self, text):
        self.calls.append(("message", text))

    def start(self, total_steps, first_step):
        self.calls.append(("start", total_steps, first_step))

    def step(self, record):
        self.calls.append(("step", record["step"]))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_llama) -> Path:
    return tiny_bundle(tmp_path_factory, tiny_llama, "llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Training data with one example far longer than --seq-len 32, and validation data."""
    folder = tmp_path_factory.mktemp("recipe-data")
    train_file = write_text_data(folder / "train.jsonl", 6)
    with open(train_file, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "hello world " * 200}) + "\n")
    return {"train": train_file, "valid": write_text_data(folder / "valid.jsonl", 3, offset=40)}


def _config(bundle, files, out, **settings) -> TrainConfig:
    values = dict(bundle=str(bundle), data=str(files["train"]), valid=str(files["valid"]), out=str(out), seq_len=32,
                  batch_size=2, threads=1, steps=3, eval_every=2, save_every=2)
    values.update(settings)
    return TrainConfig(**values)


def test_the_reporter_hears_notes_once_then_the_first_eval_then_every_step(bundle, data, tmp_path):
    reporter = RecordingReporter()
    summary = train(_config(bundle, data, tmp_path / "run"), reporter=reporter)
    notes = [call[1] for call in reporter.calls if call[0] == "note"]
    assert notes == summary["notes"] and sum("truncated" in note for note in notes) == 1
    assert "1 training examples were longer than --seq-len 32 and were truncated" in notes
    kinds = [call[0] for call in reporter.calls]
    assert kinds[len(notes):] == ["message", "start", "step", "step", "step", "close"]
    assert reporter.calls[len(notes)][1].startswith("step 0: eval loss ")
    assert ("start", 3, 0) in reporter.calls and summary["finished"] and summary["step"] == 3


def test_the_cli_says_each_data_fact_once(bundle, data, tmp_path):
    result = ok(run_ortft("train", bundle, "--data", data["train"], "--valid", data["valid"], "--out", tmp_path / "run",
                          "--seq-len", 32, "--batch-size", 2, "--threads", 1, "--steps", 1))
    assert result.stderr.count("truncated") == 1, result.stderr
    assert "note: 1 training examples were longer than --seq-len 32 and were truncated" in result.stderr


@pytest.mark.parametrize("settings, fragment", [
    ({"steps": 2, "epochs": 1.0}, "give --steps or --epochs, not both"),
    ({"steps": 0}, "--steps 0 must be at least 1"),
    ({"steps": None, "epochs": -1.0}, "--epochs -1.0 must be positive"),
    ({"data": ""}, "no training data"),
    ({"valid_fraction": 0.5}, "give --valid or --valid-fraction, not both"),
    ({"batch_size": 0}, "--batch-size 0 must be a whole number"),
])
def test_settings_are_refused_before_anything_is_read_or_written(settings, fragment, tmp_path):
    config = _config(tmp_path / "no-bundle", {"train": tmp_path / "no.jsonl", "valid": tmp_path / "no-valid.jsonl"},
                     tmp_path / "run", **settings)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        train(config, reporter=RecordingReporter())
    assert not (tmp_path / "run").exists()
