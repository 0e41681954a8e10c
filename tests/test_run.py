"""The run folder helpers (ortft/run.py): atomic checkpoints, damage detection, pruning, resolving."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ortft.adapter import load_adapter
from ortft import run as runs
from ortft.errors import DiskWriteError, RunError
from ortft.fsutil import TEMP_PREFIX


def moments(step: int) -> dict[str, np.ndarray]:
    return {f"{kind}/{name}": value * (0.5 if kind == "exp_avg" else 0.25)
            for name, value in adapter(step).items() for kind in ("exp_avg", "exp_avg_sq")}


def adapter(step: int) -> dict[str, np.ndarray]:
    return {"layer.lora_A": np.full((2, 3), step, dtype=np.float32), "layer.lora_B": np.arange(6, dtype=np.float32).reshape(3, 2) * step}


def make_run(tmp_path: Path, steps=(2, 4, 6)) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runs.RUN_FILE).write_text(json.dumps({"format": "ortft-run", "bundle": "/nowhere"}))
    for step in steps:
        runs.write_checkpoint(run_dir, step, adapter(step), {"step": step}, moments(step), step)
    return run_dir


def test_step_dir_name_sorts_numerically():
    assert runs.step_dir_name(7) == "step-00000007"
    assert runs.STEP_DIR.match(runs.step_dir_name(12345678))


def test_write_checkpoint_writes_three_files_with_hashes(tmp_path):
    run_dir = make_run(tmp_path, steps=(3,))
    folder = run_dir / "checkpoints/step-00000003"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "optimizer.safetensors", "trainer_state.json"]
    state = runs.read_state(folder)
    assert state["step"] == 3
    assert state["files"] == {name: runs.sha256_file(folder / name) for name in ("adapter.safetensors", "optimizer.safetensors")}
    loaded = load_adapter(folder / runs.ADAPTER_FILE)
    for name, value in adapter(3).items():
        assert loaded[name].dtype == np.float32 and np.array_equal(loaded[name], value)
    # The run's adapter.safetensors is the newest checkpoint's.
    assert (run_dir / runs.ADAPTER_FILE).read_bytes() == (folder / runs.ADAPTER_FILE).read_bytes()
    assert runs.checkpoint_problem(folder) is None
    assert not list((run_dir / runs.CHECKPOINTS).glob(TEMP_PREFIX + "*"))


def test_optimizer_state_round_trips_with_its_step(tmp_path):
    run_dir = make_run(tmp_path, steps=(4,))
    state, step = runs.read_optimizer_state(run_dir / "checkpoints/step-00000004")
    assert step == 4
    assert sorted(state) == sorted(moments(4))
    for key, value in moments(4).items():
        np.testing.assert_array_equal(state[key], value)
    folder = runs.write_checkpoint(run_dir, 5, adapter(5), {"step": 5})  # a federated round: no optimizer
    assert runs.read_optimizer_state(folder) is None and runs.checkpoint_problem(folder) is None


def test_a_failed_checkpoint_write_leaves_nothing_and_keeps_the_previous(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path, steps=(2,))
    before = (run_dir / runs.ADAPTER_FILE).read_bytes()

    def full_disk(state, step):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "optimizer_bytes", full_disk)
    with pytest.raises(DiskWriteError, match="disk is full"):
        runs.write_checkpoint(run_dir, 4, adapter(4), {"step": 4}, moments(4), 4)
    assert [f.name for f in runs.list_checkpoints(run_dir)] == ["step-00000002"]
    assert not list((run_dir / runs.CHECKPOINTS).glob(TEMP_PREFIX + "*"))
    assert runs.checkpoint_problem(run_dir / "checkpoints/step-00000002") is None
    assert (run_dir / runs.ADAPTER_FILE).read_bytes() == before


def test_rewriting_a_step_replaces_it_only_when_complete(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path, steps=(2,))
    folder = run_dir / "checkpoints/step-00000002"
    before = (folder / runs.OPTIMIZER_FILE).read_bytes()

    def boom(state, step):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(runs, "optimizer_bytes", boom)
        with pytest.raises(RuntimeError):
            runs.write_checkpoint(run_dir, 2, adapter(9), {"step": 2}, moments(9), 9)
    assert runs.checkpoint_problem(folder) is None and (folder / runs.OPTIMIZER_FILE).read_bytes() == before
    runs.write_checkpoint(run_dir, 2, adapter(9), {"step": 2}, moments(9), 9)
    assert runs.read_optimizer_state(folder)[1] == 9 and runs.checkpoint_problem(folder) is None


def test_list_checkpoints_newest_first_ignoring_other_folders(tmp_path):
    run_dir = make_run(tmp_path, steps=(9, 10, 100))
    (run_dir / runs.CHECKPOINTS / (TEMP_PREFIX + "step-00000200-abc")).mkdir()
    (run_dir / runs.CHECKPOINTS / "step-12").mkdir()
    (run_dir / runs.CHECKPOINTS / "notes.txt").write_text("x")
    assert [f.name for f in runs.list_checkpoints(run_dir)] == ["step-00000100", "step-00000010", "step-00000009"]
    assert runs.list_checkpoints(tmp_path / "nothing") == []


@pytest.mark.parametrize("damage,problem", [
    ("truncate-optimizer", "optimizer.safetensors does not match its recorded sha256"),
    ("flip-adapter-byte", "adapter.safetensors does not match its recorded sha256"),
    ("remove-optimizer", "optimizer.safetensors missing"),
    ("cut-state", "trainer_state.json unreadable"),
    ("remove-state", "trainer_state.json unreadable"),
    ("state-without-hashes", "lacks the file hashes"),
])
def test_checkpoint_problem_names_the_damage(tmp_path, damage, problem):
    run_dir = make_run(tmp_path, steps=(2,))
    folder = run_dir / "checkpoints/step-00000002"
    if damage == "truncate-optimizer":
        (folder / runs.OPTIMIZER_FILE).write_bytes(b"state")
    elif damage == "flip-adapter-byte":
        raw = bytearray((folder / runs.ADAPTER_FILE).read_bytes())
        raw[-1] ^= 1
        (folder / runs.ADAPTER_FILE).write_bytes(bytes(raw))
    elif damage == "remove-optimizer":
        (folder / runs.OPTIMIZER_FILE).unlink()
    elif damage == "cut-state":
        (folder / runs.STATE_FILE).write_text('{"step": 2, "fi')
    elif damage == "remove-state":
        (folder / runs.STATE_FILE).unlink()
    else:
        (folder / runs.STATE_FILE).write_text('{"step": 2}')
    assert problem in runs.checkpoint_problem(folder)


def test_newest_valid_checkpoint_skips_damaged_ones_with_a_warning(tmp_path, caplog):
    run_dir = make_run(tmp_path)
    assert runs.newest_valid_checkpoint(run_dir).name == "step-00000006"
    (run_dir / "checkpoints/step-00000006/optimizer.safetensors").write_bytes(b"")
    (run_dir / "checkpoints/step-00000004/trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="ortft.run"):
        assert runs.newest_valid_checkpoint(run_dir).name == "step-00000002"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "step-00000006" in warnings[0] and "step-00000004" in warnings[1]
    (run_dir / "checkpoints/step-00000002/adapter.safetensors").unlink()
    assert runs.newest_valid_checkpoint(run_dir) is None


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    run_dir = make_run(tmp_path, steps=(1, 2, 3, 4, 5))
    leftover = run_dir / runs.CHECKPOINTS / (TEMP_PREFIX + "step-00000006-xyz")
    leftover.mkdir()
    (leftover / "optimizer.safetensors").write_bytes(b"half")
    removed = runs.prune_checkpoints(run_dir, 2, protect={run_dir / "checkpoints/step-00000001"})
    assert sorted(f.name for f in removed) == ["step-00000002", "step-00000003"]
    assert [f.name for f in runs.list_checkpoints(run_dir)] == ["step-00000005", "step-00000004", "step-00000001"]
    assert not leftover.exists()  # a checkpoint a killed process never finished
    runs.prune_checkpoints(run_dir, 0)  # keep is at least one
    assert [f.name for f in runs.list_checkpoints(run_dir)] == ["step-00000005"]


def test_read_run_and_is_run_dir(tmp_path):
    assert not runs.is_run_dir(tmp_path)
    with pytest.raises(RunError, match="not an ortft run folder"):
        runs.read_run(tmp_path)
    (tmp_path / runs.RUN_FILE).write_text("{broken")
    assert runs.is_run_dir(tmp_path)
    with pytest.raises(RunError, match="damaged"):
        runs.read_run(tmp_path)


def test_resolve_checkpoint_latest_best_and_paths(tmp_path):
    run_dir = make_run(tmp_path)
    assert runs.resolve_checkpoint(run_dir).name == "step-00000006"
    with pytest.raises(RunError, match="no best checkpoint"):
        runs.resolve_checkpoint(run_dir, "best")
    runs.write_best(run_dir, run_dir / "checkpoints/step-00000004", 4, 1.25)
    assert json.loads((run_dir / runs.BEST_FILE).read_text()) == {"checkpoint": "checkpoints/step-00000004", "step": 4, "eval_loss": 1.25}
    assert runs.resolve_checkpoint(run_dir, "best").name == "step-00000004"
    assert runs.resolve_checkpoint(run_dir, "checkpoints/step-00000002").name == "step-00000002"
    assert runs.resolve_checkpoint(run_dir, str(run_dir / "checkpoints/step-00000002")).name == "step-00000002"
    with pytest.raises(RunError, match="does not exist"):
        runs.resolve_checkpoint(run_dir, "checkpoints/step-00000099")
    (run_dir / "checkpoints/step-00000004/optimizer.safetensors").write_bytes(b"")
    with pytest.raises(RunError, match="is damaged"):
        runs.resolve_checkpoint(run_dir, "best")
    (run_dir / "checkpoints/step-00000006/optimizer.safetensors").write_bytes(b"")
    assert runs.resolve_checkpoint(run_dir).name == "step-00000002"  # latest skips damaged ones
    for folder in runs.list_checkpoints(run_dir):
        (folder / runs.STATE_FILE).unlink()
    with pytest.raises(RunError, match="no checkpoint to use"):
        runs.resolve_checkpoint(run_dir)


def test_load_adapter_rejects_a_damaged_file(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(runs.adapter_bytes(adapter(1))[:20])
    with pytest.raises(RunError, match="not a readable safetensors file"):
        load_adapter(path)


def test_read_config_of_a_run(tmp_path):
    run_dir = make_run(tmp_path)
    assert runs.read_config(run_dir) == {}  # a run without config.json
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps({"seq_len": 64, "lr": 0.001}))
    assert runs.read_config(run_dir) == {"seq_len": 64, "lr": 0.001}
    (run_dir / runs.CONFIG_FILE).write_text("{not json")
    with pytest.raises(RunError, match="is damaged"):
        runs.read_config(run_dir)


def test_trained_on_and_resolve_run_checkpoint_name_the_bundle(tmp_path):
    from ortft.manifest import manifest_digest

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format": "ortft-bundle"}))
    run_dir = make_run(tmp_path)
    info = {"format": "ortft-run", "bundle": runs.bundle_reference(run_dir, bundle), "bundle_manifest_sha256": manifest_digest(bundle)}
    (run_dir / runs.RUN_FILE).write_text(json.dumps(info))
    assert runs.trained_on(info, bundle) and not runs.trained_on({**info, "bundle_manifest_sha256": "0" * 64}, bundle)
    chosen = runs.resolve_run_checkpoint(run_dir, "checkpoints/step-00000004")
    assert chosen.bundle_dir.resolve() == bundle.resolve() and chosen.checkpoint_dir.name == "step-00000004"
    assert chosen.adapter_path == chosen.checkpoint_dir / runs.ADAPTER_FILE
    adapter_file = run_dir / "checkpoints/step-00000002" / runs.ADAPTER_FILE
    assert runs.resolve_run_checkpoint(run_dir, str(adapter_file)) == runs.RunCheckpoint(run_dir, chosen.bundle_dir, None, adapter_file)
    (bundle / "manifest.json").write_text(json.dumps({"format": "ortft-bundle", "changed": True}))
    with pytest.raises(RunError, match="not the one run"):
        runs.resolve_run_checkpoint(run_dir)
    (bundle / "manifest.json").unlink()
    with pytest.raises(RunError, match="which has no manifest.json"):
        runs.resolve_run_checkpoint(run_dir)
