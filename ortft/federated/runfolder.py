"""The federated run folder: the layout of a training run (ortft/run.py), written by the ServerApp.

RUN/run.json            {"format": "ortft-run", "kind": "federated", bundle, bundle_manifest_sha256, ...}
RUN/config.json         the federation's settings (strategy, rounds, local steps, ...)
RUN/metrics.jsonl       one record per round: validation loss per client and overall, bytes sent
RUN/checkpoints/step-NNNNNNNN/  one per round (N = round), written by ortft.run.write_checkpoint:
                        adapter.safetensors (the global adapter), trainer_state.json (with "round")
RUN/adapter.safetensors the newest global adapter
RUN/best.json           the round with the lowest overall validation loss
So `ortft export RUN`, `ortft eval RUN` and `ortft generate` take a federated run like any other.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from .. import run as runs
from ..errors import RunError
from ..fsutil import write_json_atomic, write_text_atomic

KIND = "federated"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def start_run(run_dir: Path, bundle: Path, bundle_digest: str, task: str, settings: dict) -> None:
    """A new federated run: run.json and config.json (refuses a folder holding another run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if runs.is_run_dir(run_dir) or runs.list_checkpoints(run_dir):
        raise RunError(f"{run_dir} already holds a run", hint="continue it with --resume, or choose another --out")
    write_json_atomic(run_dir / runs.RUN_FILE, {
        "format": "ortft-run",
        "kind": KIND,
        "bundle": runs.bundle_reference(run_dir, bundle),
        "bundle_manifest_sha256": bundle_digest,
        "task": task,
        "created": now(),
        "data": {"train": None, "valid": None, "note": "each SuperNode trains on its own data"},
    })
    write_json_atomic(run_dir / runs.CONFIG_FILE, settings)


def resume_point(run_dir: Path, bundle_digest: str) -> tuple[int, Path | None, dict | None]:
    """(last completed round, its checkpoint folder, its state) of a federated run; (0, None, None) if none saved."""
    info = runs.read_run(run_dir)
    if info.get("kind") != KIND:
        raise RunError(f"{run_dir} is not a federated run", hint="resume it with `ortft train --resume`")
    if info.get("bundle_manifest_sha256") != bundle_digest:
        raise RunError(f"the bundle changed since federated run {run_dir} began (manifest sha256 differs)",
                       hint="resume with the same bundle, or start a new run with another --out")
    folder = runs.newest_valid_checkpoint(run_dir)
    if folder is None:
        return 0, None, None
    state = runs.read_state(folder)
    return int(state["round"]), folder, state


def save_round(run_dir: Path, rnd: int, adapter: dict[str, np.ndarray], state: dict, keep: int) -> Path:
    """checkpoints/step-<round>: the global adapter and the round's state."""
    state = dict(state, round=rnd, step=rnd, saved=now())
    folder = runs.write_checkpoint(run_dir, rnd, adapter, state)
    best = run_dir / runs.BEST_FILE
    protect = set()
    if best.is_file():
        protect.add(run_dir / runs.read_best(run_dir)["checkpoint"])
    runs.prune_checkpoints(run_dir, keep, protect)
    return folder


class RoundLog:
    """metrics.jsonl: one JSON record per round, flushed per record; a resume drops later rounds."""

    def __init__(self, path: Path, keep_through_round: int):
        self.path = path
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(record, dict) and record.get("round", 0) <= keep_through_round:
                    kept.append(line)
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_rounds(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / runs.METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
