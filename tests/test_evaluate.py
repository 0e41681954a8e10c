"""`ortft eval` and `evaluate_path`: loss/perplexity (or accuracy) of a bundle or a run's checkpoint."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from ortft import run as runs
from ortft.errors import DataError, RunError
from ortft.evaluate import evaluate_path
from helpers.bundles import tiny_bundle
from helpers.cli import FAST, ok, run_ortft, user_error
from helpers.data import write_text_data
from helpers.paths import ROOT
from helpers.runs import eval_losses


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_llama) -> Path:
    return tiny_bundle(tmp_path_factory, tiny_llama, "llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval-data")
    return {"train": write_text_data(folder / "train.jsonl", 16), "valid": write_text_data(folder / "valid.jsonl", 7, offset=40)}


@pytest.fixture(scope="module")
def trained(bundle, data, tmp_path_factory) -> Path:
    """A run of 8 steps with evaluation every 4 (checkpoints 4 and 8)."""
    out = tmp_path_factory.mktemp("eval-run") / "run"
    ok(run_ortft("train", bundle, "--data", data["train"], "--valid", data["valid"], "--out", out, *FAST, "--steps", "8",
                 "--eval-every", "4", "--save-every", "4", "--lr", "5e-3", "--warmup", "0"))
    return out


def eval_json(*args) -> dict:
    return json.loads(ok(run_ortft("eval", *map(str, args), "--threads", "1", "--json")).stdout)


def test_eval_bundle_json_fields_match_the_runs_first_evaluation(bundle, data, trained):
    record = eval_json(bundle, "--data", data["valid"], "--seq-len", "64")
    assert set(record) == {"loss", "perplexity", "tokens", "examples", "checkpoint"}
    assert record["checkpoint"] == "bundle" and record["examples"] == 7 and record["tokens"] > 0
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    first = dict(eval_losses(trained))[0]
    assert record["loss"] == pytest.approx(first, rel=1e-5)  # the bundle is the run before its first step
    metrics = [json.loads(line) for line in (trained / runs.METRICS_FILE).read_text().splitlines()]
    assert record["tokens"] == metrics[0]["eval_tokens"]


def test_eval_loss_is_token_weighted_whatever_the_batch_size(bundle, data):
    losses = [eval_json(bundle, "--data", data["valid"], "--batch-size", size)["loss"] for size in (1, 3, 8)]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)


def test_eval_run_uses_latest_best_or_a_given_checkpoint(data, trained):
    evals = dict(eval_losses(trained))
    latest = eval_json(trained, "--data", data["valid"], "--seq-len", "64")
    assert latest["checkpoint"].endswith("checkpoints/step-00000008")
    assert latest["loss"] == pytest.approx(evals[8], rel=1e-5)
    assert latest["loss"] < evals[0]  # training helped
    best = json.loads((trained / runs.BEST_FILE).read_text())
    assert eval_json(trained, "--data", data["valid"], "--seq-len", "64", "--checkpoint", "best")["loss"] == pytest.approx(best["eval_loss"], rel=1e-5)
    step4 = eval_json(trained, "--data", data["valid"], "--seq-len", "64", "--checkpoint", "checkpoints/step-00000004")
    assert step4["checkpoint"].endswith("step-00000004") and step4["loss"] == pytest.approx(evals[4], rel=1e-5)


def test_eval_text_output(bundle, data):
    result = ok(run_ortft("eval", bundle, "--data", data["valid"], "--threads", "1"))
    lines = result.stdout.splitlines()
    assert lines[0].startswith("loss") and lines[1].startswith("perplexity") and lines[2].startswith("tokens")
    assert "(7 examples; bundle)" in lines[2] and "Traceback" not in result.stderr


def test_eval_seq_cls_reports_accuracy(tiny_model_factory, tmp_path_factory):
    cls_bundle = tiny_bundle(tmp_path_factory, tiny_model_factory("llama", "seq-cls"), "llama-seq-cls",
                             task="seq-cls", labels=["negative", "positive"])
    record = eval_json(cls_bundle, "--data", ROOT / "data/cls/valid.jsonl", "--batch-size", "8")
    assert set(record) == {"loss", "accuracy", "tokens", "examples", "checkpoint"}
    assert record["examples"] == record["tokens"] == 40 and 0.0 <= record["accuracy"] <= 1.0
    text = ok(run_ortft("eval", cls_bundle, "--data", ROOT / "data/cls/valid.jsonl", "--threads", "1")).stdout
    assert "accuracy" in text and "perplexity" not in text


def test_eval_skips_a_damaged_newest_checkpoint_with_a_warning(bundle, data, trained, tmp_path, caplog):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "checkpoints/step-00000008/optimizer.safetensors").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="ortft.run"):
        record = evaluate_path(run_dir, data["valid"], seq_len=64, threads=1)
    assert record["checkpoint"].endswith("step-00000004")
    assert record["loss"] == pytest.approx(dict(eval_losses(trained))[4], rel=1e-5)
    assert any("skipping damaged checkpoint" in r.getMessage() and "step-00000008" in r.getMessage() for r in caplog.records)
    with pytest.raises(RunError, match="is damaged"):
        evaluate_path(run_dir, data["valid"], checkpoint="checkpoints/step-00000008", threads=1)


def test_eval_refuses_a_run_whose_bundle_changed(data, trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    run_info = json.loads((run_dir / runs.RUN_FILE).read_text())
    run_info["bundle_manifest_sha256"] = "0" * 64
    (run_dir / runs.RUN_FILE).write_text(json.dumps(run_info))
    user_error(run_ortft("eval", run_dir, "--data", data["valid"]), "changed since run")


def test_eval_bad_input_exits_2_without_traceback(bundle, data, trained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n[1, 2]\n')
    user_error(run_ortft("eval", bundle, "--data", bad), "bad.jsonl, line 2")
    user_error(run_ortft("eval", bundle, "--data", tmp_path / "missing.jsonl"), "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    user_error(run_ortft("eval", bundle, "--data", empty))
    user_error(run_ortft("eval", tmp_path, "--data", data["valid"]))  # neither a bundle nor a run
    user_error(run_ortft("eval", tmp_path / "nowhere", "--data", data["valid"]))
    user_error(run_ortft("eval", trained, "--data", data["valid"], "--checkpoint", "checkpoints/step-00000099"), "does not exist")
    user_error(run_ortft("eval", bundle, "--data", data["valid"], "--batch-size", "0"))


def test_eval_on_an_export_folder_names_it_and_suggests_the_run_folder(data, trained, tmp_path):
    from ortft.export import export_run

    export = tmp_path / "export"
    export_run(trained, export, checkpoint="best", kind="adapter")
    stderr = user_error(run_ortft("eval", export, "--data", data["valid"]),
                        f"{export} is an export folder (adapter, exported from run folder 'run' at checkpoints/step-",
                        "not a bundle or a run folder")
    hint = stderr.split("what to do: ", 1)[1]
    checkpoint = json.loads((export / "manifest.json").read_text())["source"]["checkpoint"]
    assert hint.startswith(f"evaluate the run folder it came from: ortft eval RUN_DIR --data {data['valid']} --checkpoint {checkpoint}")
    assert "the `ortft train --out` folder named 'run'" in hint


def test_evaluate_path_raises_user_errors(bundle, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(DataError):
        evaluate_path(bundle, bad, threads=1)


def test_eval_run_defaults_to_the_runs_seq_len(bundle, data, tmp_path):
    """Without --seq-len, a run is evaluated at the length it was trained with (here 16: truncating)."""
    out = tmp_path / "short"
    ok(run_ortft("train", bundle, "--data", data["train"], "--out", out, "--seq-len", "16", "--batch-size", "2",
                 "--threads", "1", "--steps", "2", "--save-every", "2"))
    default = eval_json(out, "--data", data["valid"])
    explicit = eval_json(out, "--data", data["valid"], "--seq-len", "16")
    longer = eval_json(out, "--data", data["valid"], "--seq-len", "64")
    assert default["loss"] == explicit["loss"] and default["tokens"] == explicit["tokens"]
    assert longer["tokens"] > default["tokens"]
