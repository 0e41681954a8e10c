"""ortft/upgrade.py and ortft/legacy_checkpoint.py: bundles and runs made for ORT's training API keep working.

tests/data/legacy holds a tiny format-1 bundle and a 3-step run made by the last ortft on the training API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

LEGACY = Path(__file__).parent / "data" / "legacy"
DATA = Path(__file__).parents[1] / "data" / "sft" / "train.jsonl"


@pytest.fixture()
def legacy(tmp_path):
    """Copies of the legacy bundle and run, the run pointing at the copied bundle."""
    bundle, run = tmp_path / "bundle", tmp_path / "run"
    shutil.copytree(LEGACY / "bundle", bundle)
    shutil.copytree(LEGACY / "run", run)
    info = json.loads((run / "run.json").read_text())
    info["bundle"] = str(bundle)
    (run / "run.json").write_text(json.dumps(info))
    return bundle, run


def ortft(*args, check=True):
    return subprocess.run([sys.executable, "-m", "ortft", *map(str, args)], capture_output=True, text=True, check=check)


def test_reads_ort_checkpoints_without_the_training_build(legacy):
    """The run's ORT checkpoint holds the adapter the run also saved as safetensors, and AdamW's state."""
    from ortft.legacy_checkpoint import read_ort_checkpoint
    from ortft.adapter import load_adapter

    _bundle, run = legacy
    folder = run / "checkpoints" / "step-00000003"
    checkpoint = read_ort_checkpoint(folder / "checkpoint")
    adapter = load_adapter(folder / "adapter.safetensors")
    assert sorted(checkpoint.trainable) == sorted(adapter)
    for name, value in adapter.items():
        np.testing.assert_array_equal(checkpoint.trainable[name], value)
    state, step = checkpoint.optimizer_state()
    assert step == 3
    assert set(state) == {f"{kind}/{name}" for name in adapter for kind in ("exp_avg", "exp_avg_sq")}
    assert all(np.all(state[f"exp_avg_sq/{name}"] >= 0) for name in adapter)
    assert any(np.abs(state[f"exp_avg/{name}"]).max() > 0 for name in adapter)


def test_a_damaged_checkpoint_is_a_clean_error(tmp_path):
    from ortft.errors import RunError
    from ortft.legacy_checkpoint import read_ort_checkpoint

    (tmp_path / "checkpoint").write_bytes(b"not a flatbuffer at all")
    with pytest.raises(RunError, match="not an ORT training checkpoint"):
        read_ort_checkpoint(tmp_path / "checkpoint")


def test_train_refuses_an_old_bundle_and_names_the_upgrade(legacy, tmp_path):
    bundle, _run = legacy
    result = ortft("train", bundle, "--data", DATA, "--out", tmp_path / "new", "--steps", 1, check=False)
    assert result.returncode == 2
    assert "ortft upgrade" in result.stderr and "Traceback" not in result.stderr


def test_upgrade_then_train_eval_and_resume_the_old_run(legacy, tmp_path):
    """After `ortft upgrade`: the bundle validates on stock onnxruntime, its initial adapter is the old
    checkpoint's, the old run resumes from its ORT checkpoint (moments and step count carried over) and
    evaluates; a second upgrade changes nothing."""
    from safetensors.numpy import load_file

    from ortft.legacy_checkpoint import read_ort_checkpoint

    bundle, run = legacy
    old_trainable = read_ort_checkpoint(bundle / "checkpoint").trainable
    result = ortft("upgrade", bundle)
    assert "upgraded" in result.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["upgraded_from"]["format_version"] == 1
    assert not (bundle / "checkpoint").exists() and not (bundle / "optimizer_model.onnx").exists()
    initial = load_file(str(bundle / "initial_adapter.safetensors"))
    for name, value in old_trainable.items():
        np.testing.assert_array_equal(initial[name], value)
    assert "is valid" in ortft("validate", bundle).stdout
    again = ortft("upgrade", bundle)
    assert "already" in again.stderr
    ortft("train", bundle, "--data", DATA, "--out", run, "--steps", 5, "--batch-size", 2, "--seq-len", 32,
          "--save-every", 2, "--keep", 2, "--threads", 1, "--resume")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "loss" in record and record.get("event") != "summary"]
    assert steps == [1, 2, 3, 4, 5]
    assert all(np.isfinite(record["loss"]) for record in records if "loss" in record)
    newest = run / "checkpoints" / "step-00000005"
    assert (newest / "optimizer.safetensors").is_file() and not (newest / "checkpoint").exists()
    from ortft.run import read_optimizer_state

    _state, step = read_optimizer_state(newest)
    assert step == 5  # the 3 steps of the training API, then 2 more
    evaluation = json.loads(ortft("eval", run, "--data", DATA, "--batch-size", 2, "--seq-len", 32, "--json").stdout)
    assert np.isfinite(evaluation["loss"])
