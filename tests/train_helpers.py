"""Shared helpers of the training and evaluation tests: tiny bundles, data files, running `ortft`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Small, fast, deterministic settings for the tiny bundles (threads=1 makes ORT bit-reproducible).
FAST = ("--seq-len", "64", "--batch-size", "2", "--threads", "1")

_WORDS = ["Paris", "France", "hello", "world", "capital", "answer", "six", "seven"]


def tiny_bundle(tmp_path_factory, model_dir: Path, name: str, **settings) -> Path:
    """A bundle prepared from `model_dir` once per test session (shared by every test module)."""
    from prepare.helpers import prepare_tiny

    folder = tmp_path_factory.getbasetemp() / "train-bundles" / name
    if not (folder / "manifest.json").is_file():
        prepare_tiny(model_dir, folder, **settings)
    return folder


def write_text_data(path: Path, count: int, offset: int = 0) -> Path:
    """`count` short {"text": ...} lines that a tiny model can learn (recurring words and patterns)."""
    lines = []
    for i in range(offset, offset + count):
        lines.append(json.dumps({"text": f"The capital of {_WORDS[i % 8]} is {_WORDS[(i * 3) % 8]}. Answer: {i * 7}. hello world"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ortft_command(*args) -> list[str]:
    return [sys.executable, "-m", "ortft", *map(str, args)]


def run_ortft(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(ortft_command(*args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    return result


def user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert exit code 2, one clear message and no traceback; return stderr."""
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r and "event" not in r]


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in read_metrics(run_dir) if "eval_loss" in r]


def read_adapter(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = Path(path)
    return dict(load_file(str(path / "adapter.safetensors" if path.is_dir() else path)))


def assert_same_training(run_dir: Path, reference_dir: Path) -> None:
    """Bit-equal final adapters and equal per-step training (and evaluation) losses."""
    assert train_losses(run_dir) == train_losses(reference_dir)
    assert eval_losses(run_dir) == eval_losses(reference_dir)
    ours, theirs = read_adapter(run_dir), read_adapter(reference_dir)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert np.array_equal(ours[name], theirs[name]), name
