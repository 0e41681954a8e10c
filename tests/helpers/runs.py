"""A run folder's records as tests read them (metrics, adapters), and a hand-made run of a tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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


def make_run(run_dir: Path, bundle, steps: tuple[int, ...] = (10,), best_step: int | None = None,
             adapter: dict | None = None) -> Path:
    """A run folder of `bundle` as `ortft train` writes it, without training: run.json, checkpoints/step-N
    (written by ortft.run, with their hashes) holding `adapter`, and best.json naming `best_step`.

    `bundle` is a bundle folder (its initial adapter is the default `adapter`) or a `TinyBundle` (or anything
    with `bundle_dir` and `adapter`).
    """
    from ortft import run as runs
    from ortft.bundle import MANIFEST_NAME
    from ortft.initial_adapter import initial_parameters
    from ortft.manifest import manifest_digest, read_manifest

    bundle_dir = Path(getattr(bundle, "bundle_dir", bundle))
    if adapter is None:
        adapter = bundle.adapter if hasattr(bundle, "adapter") else initial_parameters(bundle_dir, read_manifest(bundle_dir))
    task = json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8")).get("task")
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"format": "ortft-run", "bundle": runs.bundle_reference(run_dir, bundle_dir),
            "bundle_manifest_sha256": manifest_digest(bundle_dir), "task": task}
    (run_dir / runs.RUN_FILE).write_text(json.dumps(info), encoding="utf-8")
    for step in steps:
        folder = runs.write_checkpoint(run_dir, step, adapter, {"step": step})
        if step == best_step:
            runs.write_best(run_dir, folder, step, 1.0)
    return run_dir
