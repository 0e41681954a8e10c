"""`ortft train`: resume equals an uninterrupted run, crash safety of checkpoints, signals, learning, the CLI."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ortft import run as runs
from ortft.fsutil import TEMP_PREFIX
from ortft.runtime import TrainingSession
from helpers.bundles import tiny_bundle
from helpers.cli import FAST, ok, ortft_command, run_ortft, user_error
from helpers.data import write_text_data
from helpers.paths import ROOT
from helpers.runs import assert_same_training, eval_losses, read_adapter, read_metrics, train_losses

# 16 examples at batch size 2: 8 batches per epoch, so 12 steps cross one epoch boundary (after step 8).
BATCHES_PER_EPOCH = 8
BASE = (*FAST, "--steps", "12", "--eval-every", "4", "--save-every", "4", "--lr", "5e-3", "--warmup", "2")
# A run long enough to be interrupted from outside (no validation, one checkpoint at the end).
LONG = (*FAST, "--steps", "300", "--eval-every", "1000", "--save-every", "1000", "--lr", "1e-3")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_llama) -> Path:
    """The tiny llama bundle without gradient-norm clipping.

    ORT's ClipGradNorm sums the per-tensor norms in an order that depends on memory addresses, so
    once clipping is active two identical runs in separate processes can differ in the last bit
    (seen after ~50 steps; identical under `setarch -R`). Clipping keeps no state, so it has no part
    in what a resume must restore; without it, runs are bit-reproducible and can be compared exactly.
    """
    return tiny_bundle(tmp_path_factory, tiny_llama, "llama-noclip", max_grad_norm=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("train-data")
    return {"train": write_text_data(folder / "train.jsonl", 16), "valid": write_text_data(folder / "valid.jsonl", 6, offset=40)}


def train_cmd(bundle: Path, data: dict, out: Path, *extra, valid: bool = True) -> list:
    args = ["train", bundle, "--data", data["train"], "--out", out]
    if valid:
        args += ["--valid", data["valid"]]
    return [*args, *extra]


@pytest.fixture(scope="module")
def reference(bundle, data, tmp_path_factory) -> Path:
    """BASE trained straight through, 12 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ok(run_ortft(*train_cmd(bundle, data, out, *BASE)))
    return out


@pytest.fixture(scope="module")
def long_reference(bundle, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long-reference") / "run"
    ok(run_ortft(*train_cmd(bundle, data, out, *LONG, valid=False)))
    return out


# ---- what a run writes ------------------------------------------------------------------------


def test_run_folder_metrics_and_checkpoints(reference, bundle):
    records = read_metrics(reference)
    training = [r for r in records if "loss" in r and "event" not in r]
    evaluation = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in training] == list(range(1, 13))
    for record in training:
        assert {"step", "loss", "lr", "tokens_per_s"} <= record.keys()
        assert np.isfinite(record["loss"]) and record["lr"] > 0 and record["tokens_per_s"] > 0
    assert [r["step"] for r in evaluation] == [0, 4, 8, 12]
    for record in evaluation:
        assert record["eval_perplexity"] == pytest.approx(np.exp(record["eval_loss"]))
        assert "eval_accuracy" not in record
    summary = records[-1]
    assert summary["event"] == "summary" and summary["finished"] is True and summary["step"] == 12
    assert summary["first_eval_loss"] == evaluation[0]["eval_loss"]
    assert summary["best_eval_loss"] == min(r["eval_loss"] for r in evaluation)
    assert json.loads((reference / "summary.json").read_text()) == summary

    run_info = json.loads((reference / runs.RUN_FILE).read_text())
    assert not Path(run_info["bundle"]).is_absolute() and run_info["task"] == "causal-lm"  # no host path (issue 21)
    assert runs.run_bundle_dir(reference, run_info).resolve() == bundle.resolve()
    config = json.loads((reference / runs.CONFIG_FILE).read_text())
    assert config["steps"] == 12 and config["seq_len"] == 64 and config["threads"] == 1 and config["total_steps"] == 12

    folders = runs.list_checkpoints(reference)
    assert [f.name for f in folders] == ["step-00000012", "step-00000008", "step-00000004"]  # --keep 3
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "optimizer.safetensors", "trainer_state.json"]
        assert runs.checkpoint_problem(folder) is None
        state = runs.read_state(folder)
        assert state["step"] == int(folder.name[5:]) and state["config"]["lr"] == 5e-3
    assert not list((reference / runs.CHECKPOINTS).glob(TEMP_PREFIX + "*"))
    # The adapter alone, as safetensors: the run's copy is the newest checkpoint's, and the ORT checkpoint agrees.
    adapter = read_adapter(reference)
    newest = read_adapter(folders[0])
    assert adapter.keys() == newest.keys() and all(np.array_equal(adapter[k], newest[k]) for k in adapter)
    session = TrainingSession(bundle, parameters=folders[0] / runs.ADAPTER_FILE, threads=1, with_optimizer=False)
    for name, value in adapter.items():
        assert np.array_equal(session.parameter(name), value)
    best = json.loads((reference / runs.BEST_FILE).read_text())
    assert best["eval_loss"] == summary["best_eval_loss"] and (reference / best["checkpoint"]).is_dir()


def test_best_checkpoint_is_protected_and_the_old_best_is_pruned(bundle, data, tmp_path):
    out = tmp_path / "run"
    ok(run_ortft(*train_cmd(bundle, data, out, *FAST, "--steps", "8", "--eval-every", "2", "--save-every", "2",
                            "--lr", "5e-3", "--warmup", "0", "--keep", "1")))
    evals = eval_losses(out)
    assert all(b < a for (_, a), (_, b) in zip(evals, evals[1:])), evals  # every evaluation is a new best
    assert [f.name for f in runs.list_checkpoints(out)] == ["step-00000008"]
    assert runs.read_state(out / "checkpoints/step-00000008")["best"]["step"] == 8
    assert json.loads((out / runs.BEST_FILE).read_text())["checkpoint"] == "checkpoints/step-00000008"


# ---- resume equals an uninterrupted run ----------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, BATCHES_PER_EPOCH], ids=["first-step", "mid-epoch", "epoch-boundary"])
def test_resume_equals_uninterrupted_run(bundle, data, reference, tmp_path, k):
    out = tmp_path / "run"
    first = ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--stop-after", k)))
    assert "resume with:" in first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is False and summary["step"] == k and summary["stopped_by"] == "stop_after"
    state = runs.read_state(runs.newest_valid_checkpoint(out))
    assert state["step"] == k
    if k == BATCHES_PER_EPOCH:  # the checkpoint sits exactly at the end of the first epoch
        assert state["data_position"]["batch_index"] == BATCHES_PER_EPOCH and state["data_position"]["epoch"] == 0
    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume")))
    assert_same_training(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True
    assert summary["first_eval_loss"] == json.loads((reference / "summary.json").read_text())["first_eval_loss"]
    assert [r for r in read_metrics(out) if r.get("event") == "summary"] == [summary]  # the stop's summary is gone


def test_three_chained_interruptions_equal_uninterrupted_run(bundle, data, reference, tmp_path):
    out = tmp_path / "run"
    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--stop-after", 3)))
    for stop in (7, 10):
        ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume", "--stop-after", stop)))
        assert runs.read_state(runs.newest_valid_checkpoint(out))["step"] == stop
    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume")))
    assert_same_training(out, reference)


def _drop_optimizer_state(folder: Path) -> None:
    """Rewrite a checkpoint with AdamW's moments zeroed, keeping it 'intact' (hashes updated)."""
    state, step = runs.read_optimizer_state(folder)
    (folder / runs.OPTIMIZER_FILE).write_bytes(runs.optimizer_bytes({key: np.zeros_like(value) for key, value in state.items()}, step))
    trainer_state = runs.read_state(folder)
    trainer_state["files"][runs.OPTIMIZER_FILE] = runs.sha256_file(folder / runs.OPTIMIZER_FILE)
    (folder / runs.STATE_FILE).write_text(json.dumps(trainer_state), encoding="utf-8")


def test_resume_without_optimizer_state_is_detected(bundle, data, reference, tmp_path):
    """Proves the equality test can fail: losing AdamW's moments changes the result."""
    out = tmp_path / "run"
    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--stop-after", 5)))
    folder = runs.newest_valid_checkpoint(out)
    _drop_optimizer_state(folder)
    assert not any(np.any(value) for value in runs.read_optimizer_state(folder)[0].values())
    assert runs.checkpoint_problem(folder) is None
    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume")))
    assert train_losses(out)[:5] == train_losses(reference)[:5]
    with pytest.raises(AssertionError):
        assert_same_training(out, reference)
    ours, theirs = read_adapter(out), read_adapter(reference)
    assert any(not np.array_equal(ours[name], theirs[name]) for name in theirs)


def test_resume_with_only_the_printed_command_uses_the_recorded_settings(bundle, data, reference, tmp_path):
    out = tmp_path / "run"
    first = ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--stop-after", 6)))
    hint = next(line for line in first.stderr.splitlines() if line.startswith("resume with: "))
    args = shlex.split(hint[len("resume with: "):])
    assert args[0] == "ortft" and "--resume" in args and "--seq-len" not in args
    ok(run_ortft(*args[1:]))
    assert_same_training(out, reference)


# ---- resume refusals ----------------------------------------------------------------------------


def test_resume_refuses_changed_settings_data_and_bundle(bundle, data, tiny_model_factory, tmp_path_factory, tmp_path):
    out = tmp_path / "run"
    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--stop-after", 4)))

    user_error(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume", "--lr", "1e-3")),
               "cannot resume with changed settings", "lr 0.005 -> 0.001")
    user_error(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume", "--batch-size", "4")), "batch_size 2 -> 4")

    changed = dict(data, train=write_text_data(tmp_path / "changed.jsonl", 17))
    user_error(run_ortft(*train_cmd(bundle, changed, out, *BASE, "--resume")), "the train data file changed")

    other = tiny_bundle(tmp_path_factory, tiny_model_factory("llama"), "llama-rank8", rank=8)
    user_error(run_ortft(*train_cmd(other, data, out, *BASE, "--resume")), "the bundle changed since run")

    user_error(run_ortft(*train_cmd(bundle, data, tmp_path / "not-a-run", *BASE, "--resume")), "is not a run folder")
    user_error(run_ortft(*train_cmd(bundle, data, out, *BASE)), "already exists")  # a new run into a used folder

    # None of the refusals touched the run: it still resumes and finishes. A longer run is allowed, with a warning.
    assert runs.read_state(runs.newest_valid_checkpoint(out))["step"] == 4
    result = ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume", "--steps", "14")))
    assert "resuming with changed settings: steps 12 -> 14" in result.stderr and "schedule" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True and summary["total_steps"] == 14


# ---- crash safety -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate-optimizer-state", "corrupt-adapter", "cut-trainer-state", "missing-file"])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(bundle, data, reference, tmp_path, damage):
    out = tmp_path / "run"
    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--stop-after", 10)))  # checkpoints 4, 8 (eval/save) and 10 (stop)
    newest = out / "checkpoints/step-00000010"
    assert runs.newest_valid_checkpoint(out) == newest
    if damage == "truncate-optimizer-state":
        target = newest / runs.OPTIMIZER_FILE
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "corrupt-adapter":
        target = newest / runs.ADAPTER_FILE
        raw = bytearray(target.read_bytes())
        raw[-5] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "cut-trainer-state":
        target = newest / runs.STATE_FILE
        target.write_text(target.read_text()[:40])
    else:
        (newest / runs.OPTIMIZER_FILE).unlink()
    assert runs.checkpoint_problem(newest) is not None
    assert runs.newest_valid_checkpoint(out) == out / "checkpoints/step-00000008"

    result = ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume")))
    assert "skipping damaged checkpoint" in result.stderr and "step-00000010" in result.stderr
    assert_same_training(out, reference)
    assert runs.checkpoint_problem(out / "checkpoints/step-00000012") is None


def test_resume_with_no_valid_checkpoint_starts_over(bundle, data, reference, tmp_path):
    out = tmp_path / "run"
    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--stop-after", 2)))
    (runs.newest_valid_checkpoint(out) / runs.STATE_FILE).unlink()
    result = ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume")))
    assert "no valid checkpoint" in result.stderr
    assert_same_training(out, reference)  # metrics hold one step-0 evaluation, not two


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0, pause: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the test could interrupt it"
        assert time.monotonic() < deadline, "timed out"
        if pause:
            time.sleep(pause)


def _trained_steps(out: Path) -> int:
    try:
        lines = (out / runs.METRICS_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return max(steps)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_resume_matches(bundle, data, long_reference, tmp_path, signum):
    out = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(ortft_command(*train_cmd(bundle, data, out, *LONG, valid=False)), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            _wait_for(lambda: _trained_steps(out) >= 3, proc)
            proc.send_signal(signum)
            returncode = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr_text = log.read_text()
    assert returncode == 0, stderr_text
    assert signum.name in stderr_text and "Traceback" not in stderr_text
    summary = json.loads((out / "summary.json").read_text())
    reached = summary["step"]
    assert summary["finished"] is False and summary["stopped_by"] == signum.name and 3 <= reached < 300
    assert _trained_steps(out) == reached
    folder = runs.newest_valid_checkpoint(out)
    assert folder.name == runs.step_dir_name(reached) and runs.read_state(folder)["step"] == reached

    hint = next(line for line in stderr_text.splitlines() if line.startswith("resume with: "))
    ok(run_ortft(*shlex.split(hint[len("resume with: "):])[1:]))
    assert_same_training(out, long_reference)


def test_sigkill_while_saving_leaves_the_previous_checkpoint(bundle, data, long_reference, tmp_path):
    """Kill -9 while a checkpoint's temporary folder exists: the previous checkpoint loads and --resume works."""
    args = (*LONG, "--save-every", "1", "--keep", "2")
    for attempt in range(5):
        out = tmp_path / f"run-{attempt}"
        checkpoints = out / runs.CHECKPOINTS
        proc = subprocess.Popen(ortft_command(*train_cmd(bundle, data, out, *args, valid=False)), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def saving() -> bool:
            try:
                names = os.listdir(checkpoints)
            except FileNotFoundError:
                return False
            return any(n.startswith("step-") for n in names) and any(n.startswith(TEMP_PREFIX + "step-") for n in names)

        try:
            _wait_for(saving, proc, pause=0)  # poll without pause: a tiny checkpoint takes milliseconds
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        if list(checkpoints.glob(TEMP_PREFIX + "*")):
            print(f"killed mid-save on attempt {attempt + 1}")
            break  # the kill landed mid-save: a half-written temporary folder is left
    else:
        pytest.fail("the kill never landed while a checkpoint was being written")

    folder = runs.newest_valid_checkpoint(out)
    assert folder is not None
    step = runs.read_state(folder)["step"]
    session = TrainingSession(bundle, parameters=folder / runs.ADAPTER_FILE, threads=1)
    adapter = read_adapter(folder)
    assert all(np.array_equal(session.parameter(name), value) for name, value in adapter.items())
    del session

    ok(run_ortft(*train_cmd(bundle, data, out, *args, "--resume", valid=False)))
    assert not list(checkpoints.glob(TEMP_PREFIX + "*"))  # the leftover was cleaned up
    assert [f.name for f in runs.list_checkpoints(out)] == ["step-00000300", "step-00000299"]
    assert step < 300
    assert_same_training(out, long_reference)


def _in_process(argv: list, capsys) -> tuple[int, str]:
    from ortft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return exit_info.value.code, capsys.readouterr().err


def test_full_disk_while_checkpointing(bundle, data, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_bytes = runs.optimizer_bytes
    calls = []

    def save_until_the_disk_fills(state, step):
        calls.append(step)
        if len(calls) == 3:  # the checkpoint of step 12: the kernel's own ENOSPC, from a write to /dev/full
            with open("/dev/full", "wb") as full:
                full.write(b"\0" * 65536)
                full.flush()
        return real_bytes(state, step)

    monkeypatch.setattr(runs, "optimizer_bytes", save_until_the_disk_fills)
    code, stderr = _in_process(train_cmd(bundle, data, out, *BASE), capsys)
    monkeypatch.undo()
    assert code == 2 and "disk is full" in stderr and "Traceback" not in stderr
    assert len(calls) == 3
    folders = runs.list_checkpoints(out)
    assert [f.name for f in folders] == ["step-00000008", "step-00000004"]
    assert all(runs.checkpoint_problem(f) is None for f in folders)
    assert not list((out / runs.CHECKPOINTS).glob(TEMP_PREFIX + "*"))
    expected = read_adapter(reference / "checkpoints/step-00000008")
    for adapter in (read_adapter(folders[0]), read_adapter(out)):
        assert all(np.array_equal(adapter[name], value) for name, value in expected.items())
    assert not (out / "summary.json").exists()

    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume")))
    assert_same_training(out, reference)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(bundle, data, reference, tmp_path, monkeypatch, capsys, bad):
    out = tmp_path / "run"
    real_step = TrainingSession.train_step_forward_backward
    calls = []

    def diverging(self, batch):
        calls.append(1)
        outputs = real_step(self, batch)
        return [np.array(bad, dtype=np.float32)] if len(calls) >= 6 else outputs

    monkeypatch.setattr(TrainingSession, "train_step_forward_backward", diverging)
    code, stderr = _in_process(train_cmd(bundle, data, out, *BASE), capsys)
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in stderr
    assert f"the loss became {bad} at step 6" in stderr and "last good checkpoint was kept" in stderr
    assert [f.name for f in runs.list_checkpoints(out)] == ["step-00000004"]
    folder = out / "checkpoints/step-00000004"
    assert runs.checkpoint_problem(folder) is None
    expected = read_adapter(reference / "checkpoints/step-00000004")
    for adapter in (read_adapter(folder), read_adapter(out)):
        assert all(np.array_equal(adapter[name], value) for name, value in expected.items())
    assert max(step for step, _ in train_losses(out)) == 5  # the diverged step is not recorded

    ok(run_ortft(*train_cmd(bundle, data, out, *BASE, "--resume")))
    assert_same_training(out, reference)


# ---- learning -----------------------------------------------------------------------------------


def test_loss_falls_on_a_tiny_model(bundle, data, tmp_path):
    out = tmp_path / "run"
    ok(run_ortft(*train_cmd(bundle, data, out, *FAST, "--steps", "40", "--lr", "5e-3", "--schedule", "constant",
                            "--warmup", "0", "--eval-every", "5", "--save-every", "100")))
    evals = [loss for _, loss in eval_losses(out)]
    assert len(evals) == 9
    assert all(b <= a + 0.02 for a, b in zip(evals, evals[1:])), evals
    assert evals[-1] < 0.9 * evals[0], evals
    losses = [loss for _, loss in train_losses(out)]
    windows = [float(np.mean(losses[i : i + 8])) for i in range(0, 40, 8)]
    assert all(b < a for a, b in zip(windows, windows[1:])), windows


def test_seq_cls_bundle_trains_and_reports_accuracy(tiny_model_factory, tmp_path_factory, tmp_path):
    cls_bundle = tiny_bundle(tmp_path_factory, tiny_model_factory("llama", "seq-cls"), "llama-seq-cls",
                             task="seq-cls", labels=["negative", "positive"])
    out = tmp_path / "run"
    train_file = ROOT / "data/cls/train.jsonl"
    ok(run_ortft("train", cls_bundle, "--data", train_file, "--valid", ROOT / "data/cls/valid.jsonl", "--out", out,
                 *FAST, "--batch-size", "8", "--steps", "50", "--lr", "3e-3", "--warmup", "0", "--eval-every", "25",
                 "--save-every", "100"))
    records = read_metrics(out)
    evaluation = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluation] == [0, 25, 50]
    for record in evaluation:
        assert 0.0 <= record["eval_accuracy"] <= 1.0 and "eval_perplexity" not in record
        assert record["eval_tokens"] == 40  # one position per validation example
    assert records[-1]["event"] == "summary" and records[-1]["finished"] is True
    # A random tiny model with a 320-token vocabulary cannot generalise; it can fit the training set.
    before = json.loads(ok(run_ortft("eval", cls_bundle, "--data", train_file, "--threads", "1", "--json")).stdout)
    after = json.loads(ok(run_ortft("eval", out, "--data", train_file, "--threads", "1", "--json")).stdout)
    assert after["loss"] < before["loss"] - 0.05 and after["accuracy"] > before["accuracy"] + 0.1, (before, after)


# ---- the command line ---------------------------------------------------------------------------


def test_config_yaml_with_flags_overriding_it(bundle, data, tmp_path):
    out = tmp_path / "run"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "data": str(data["train"]), "out": str(out), "valid-fraction": 0.25, "steps": 6, "batch-size": 2,
        "seq_len": 64, "lr": 1e-3, "schedule": "linear", "warmup": 2, "threads": 1, "eval_every": 3, "keep": 1,
    }))
    ok(run_ortft("train", bundle, "--config", config_file, "--lr", "2e-3", "--steps", "4"))
    config = json.loads((out / runs.CONFIG_FILE).read_text())
    assert config["lr"] == 2e-3 and config["steps"] == 4 and config["total_steps"] == 4  # flags win
    assert config["schedule"] == "linear" and config["batch_size"] == 2 and config["seq_len"] == 64  # from the file
    assert config["valid_fraction"] == 0.25 and config["keep"] == 1 and config["threads"] == 1
    assert config["device"] == "cpu" and config["data"] == str(data["train"])
    assert config["grad_accum"] == 1 and config["pack"] is False  # defaults
    from ortft.schedule import learning_rate

    lrs = [r["lr"] for r in read_metrics(out) if "loss" in r and "event" not in r]
    assert lrs == [learning_rate(step, 4, 2e-3, 2, "linear") for step in range(1, 5)]
    assert [s for s, _ in eval_losses(out)] == [0, 3, 4]  # the --valid-fraction split is evaluated


def test_epochs_and_grad_accum_plan_the_steps(bundle, data, tmp_path):
    out = tmp_path / "epochs"
    ok(run_ortft(*train_cmd(bundle, data, out, *FAST, "--epochs", "1.5", "--save-every", "100", valid=False)))
    assert json.loads((out / "summary.json").read_text())["total_steps"] == 12
    out = tmp_path / "accum"
    ok(run_ortft(*train_cmd(bundle, data, out, *FAST, "--epochs", "1", "--grad-accum", "2", "--save-every", "100", valid=False)))
    training = [r for r in read_metrics(out) if "loss" in r and "event" not in r]
    assert len(training) == 4 and all(r["tokens"] > 0 for r in training)
    assert runs.read_state(runs.newest_valid_checkpoint(out))["data_position"]["batch_index"] == BATCHES_PER_EPOCH


def test_batch_tokens_trains_on_length_grouped_batches_and_resumes(bundle, data, tmp_path):
    out = tmp_path / "grouped"
    ok(run_ortft(*train_cmd(bundle, data, out, *FAST, "--batch-tokens", "128", "--epochs", "1", "--save-every", "100",
                            valid=False)))
    config = json.loads((out / runs.CONFIG_FILE).read_text())
    assert config["batch_tokens"] == 128
    training = [r for r in read_metrics(out) if "loss" in r and "event" not in r]
    assert len(training) == config["total_steps"] < BATCHES_PER_EPOCH  # more examples per step than --batch-size 2
    assert all(np.isfinite(r["loss"]) for r in training)
    interrupted = tmp_path / "interrupted"
    ok(run_ortft(*train_cmd(bundle, data, interrupted, *FAST, "--batch-tokens", "128", "--epochs", "1",
                            "--save-every", "100", "--stop-after", "1", valid=False)))
    ok(run_ortft(*train_cmd(bundle, data, interrupted, *FAST, "--resume", valid=False)))
    resumed = [r for r in read_metrics(interrupted) if "loss" in r and "event" not in r]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in training], rel=1e-6)


def test_the_default_seq_len_fits_a_bundle_with_a_shorter_context(bundle, data, tmp_path):
    """The tiny bundle takes at most 256 tokens a row: without --seq-len, train uses 256, not the default 512."""
    assert json.loads((bundle / "manifest.json").read_text())["model"]["max_seq_len"] == 256
    out = tmp_path / "run"
    result = ok(run_ortft("train", bundle, "--data", data["train"], "--out", out, "--steps", "2", "--batch-size", "2",
                          "--threads", "1"))
    assert "note: --seq-len 256, the bundle's max_seq_len (the default 512 is longer)" in result.stderr
    assert json.loads((out / runs.CONFIG_FILE).read_text())["seq_len"] == 256
    resumed = ok(run_ortft("train", bundle, "--data", data["train"], "--out", out, "--steps", "3", "--resume"))
    assert "note: --seq-len" not in resumed.stderr  # the run's recorded 256
    yaml_config = tmp_path / "run.yaml"
    yaml_config.write_text("seq_len: 32\nsteps: 1\nbatch_size: 2\n")
    ok(run_ortft("train", bundle, "--config", yaml_config, "--data", data["train"], "--out", tmp_path / "from-yaml"))
    assert json.loads((tmp_path / "from-yaml" / runs.CONFIG_FILE).read_text())["seq_len"] == 32
    user_error(run_ortft("train", bundle, "--data", data["train"], "--out", tmp_path / "explicit", "--seq-len", "512"),
               "--seq-len 512 exceeds the bundle's max_seq_len 256", "use at most 256")


@pytest.mark.parametrize("args,message", [
    (("--steps", "0"), "--steps 0 must be at least 1"),
    (("--steps", "4", "--epochs", "1"), "not both"),
    (("--seq-len", "1000"), "exceeds the bundle's max_seq_len"),
    (("--lr", "0"), "--lr 0.0 must be positive"),
    (("--batch-size", "0"), "--batch-size 0 must be"),
    (("--valid-fraction", "1.5"), "must lie between 0 and 1"),
    (("--provider", "nonsense"), ""),
    (("--batch-tokens", "10"), "--batch-tokens must be a whole number of at least --seq-len"),
    (("--batch-tokens", "128", "--pack"), "not both"),
], ids=["steps-0", "steps-and-epochs", "seq-len", "lr", "batch-size", "valid-fraction", "provider", "batch-tokens",
        "batch-tokens-and-pack"])
def test_train_rejects_bad_settings_with_exit_2(bundle, data, tmp_path, args, message):
    out = tmp_path / "run"
    user_error(run_ortft("train", bundle, "--data", data["train"], "--out", out, *FAST, *args), message)
    assert not (out / runs.CHECKPOINTS).exists()


def test_train_rejects_bad_input_with_exit_2(bundle, data, tmp_path):
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    user_error(run_ortft("train", bundle, "--data", bad, "--out", out, *FAST), "bad.jsonl", "line 2")
    user_error(run_ortft("train", bundle, "--data", tmp_path / "missing.jsonl", "--out", out, *FAST), "missing.jsonl")
    user_error(run_ortft("train", tmp_path, "--data", data["train"], "--out", out, *FAST))  # not a bundle
    user_error(run_ortft("train", bundle, "--out", out, *FAST), "no training data")
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("steps: [1\n")
    user_error(run_ortft("train", bundle, "--config", broken_yaml, "--data", data["train"], "--out", out), "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("stepz: 3\n")
    user_error(run_ortft("train", bundle, "--config", unknown, "--data", data["train"], "--out", out), "unknown option 'stepz'")
    assert not out.exists()


# ---- SmolLM2-135M, real weights ---------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_validation_loss_falls_by_a_fifth(smollm2_bundle, tmp_path):
    """Real weights (SmolLM2-135M-Instruct, Q4_1 GGUF) on data/sft/: validation loss falls >= 20% in minutes."""
    bundle = smollm2_bundle
    started = prepared = time.monotonic()
    out = tmp_path / "run"
    ok(run_ortft("train", bundle, "--data", ROOT / "data/sft/train.jsonl", "--valid", ROOT / "data/sft/valid.jsonl",
                 "--out", out, "--seq-len", "256", "--batch-size", "4", "--steps", "16", "--lr", "1e-3", "--warmup", "4",
                 "--eval-every", "16", "--save-every", "16", timeout=600))
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["first_eval_loss"], summary["best_eval_loss"]
    print(f"SmolLM2-135M: validation loss {before:.4f} -> {after:.4f} ({1 - after / before:.0%} lower); "
          f"prepare {prepared - started:.0f} s, train {time.monotonic() - prepared:.0f} s")
    assert after <= 0.8 * before, (before, after)
    evaluated = json.loads(ok(run_ortft("eval", out, "--data", ROOT / "data/sft/valid.jsonl", "--seq-len", "256",
                                        "--json", timeout=300)).stdout)
    assert evaluated["loss"] == pytest.approx(after, rel=1e-4)


def test_a_bundle_with_the_old_adamw_update_trains_with_a_note(bundle, data, tmp_path):
    """Bundles made before prepare set PyTorch's AdamW update still train (with it), and say so."""
    import shutil

    old = tmp_path / "old-bundle"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
    del manifest["optimizer"]["update"]
    (old / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = run_ortft(*train_cmd(old, data, tmp_path / "run", *FAST, "--steps", "1", valid=False))
    ok(result)
    assert "old transformers.AdamW update" in result.stderr and "PyTorch's AdamW update" in result.stderr
    result = run_ortft(*train_cmd(bundle, data, tmp_path / "run-new", *FAST, "--steps", "1", valid=False))
    ok(result)
    assert "transformers.AdamW" not in result.stderr
