"""The run folder of `ortft train`: its layout, its checkpoints, and finding the newest valid one.

RUN/run.json            which bundle (path + manifest sha256) and data the run trains on
RUN/config.json         the full resolved training configuration
RUN/metrics.jsonl       one JSON object per line (training and evaluation records)
RUN/checkpoints/step-NNNNNNNN/{adapter.safetensors, optimizer.safetensors, trainer_state.json}
RUN/best.json           {"checkpoint": "checkpoints/step-...", "step", "eval_loss"} once an eval ran
RUN/adapter.safetensors the newest adapter weights (graph names -> float32 arrays)
A checkpoint folder is written under a temporary name and renamed when complete; trainer_state.json
records the sha256 of the other files, so a damaged checkpoint is detected and skipped. The adapter
holds the trainable tensors by graph name; optimizer.safetensors AdamW's moments (`exp_avg/NAME`,
`exp_avg_sq/NAME`) with its step count in the metadata. Runs made for ORT's training API have an ORT
`checkpoint` file instead of optimizer.safetensors: `read_optimizer_state` converts it when read.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from .errors import RunError
from .fsutil import TEMP_PREFIX, sha256_file, staged_dir, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.json"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ORT_CHECKPOINT = "checkpoint"  # runs made for ORT's training API (read by ortft/legacy_checkpoint.py)
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def adapter_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in arrays.items()}, metadata=metadata)


def load_adapter(path: Path | str) -> dict[str, np.ndarray]:
    """Adapter weights keyed by graph name, from a safetensors file (a damaged file is a RunError)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"adapter weights {path} are not a readable safetensors file ({exc})", hint="the file is damaged; pick another checkpoint") from exc


def optimizer_bytes(state: dict[str, np.ndarray], step: int) -> bytes:
    return adapter_bytes(state, {"step": str(int(step)), "optimizer": "adamw"})


def write_checkpoint(run_dir: Path, step: int, adapter: dict[str, np.ndarray], state: dict,
                     optimizer_state: dict[str, np.ndarray] | None = None, optimizer_step: int = 0) -> Path:
    """Write checkpoints/step-N atomically: adapter, optimizer state, then trainer_state with their hashes."""
    final = run_dir / CHECKPOINTS / step_dir_name(step)
    with staged_dir(final, force=True) as tmp:
        (tmp / ADAPTER_FILE).write_bytes(adapter_bytes(adapter, {"step": str(step)}))
        if optimizer_state:
            (tmp / OPTIMIZER_FILE).write_bytes(optimizer_bytes(optimizer_state, optimizer_step))
        state = dict(state)
        written = sorted(path.name for path in tmp.iterdir())
        state["files"] = {name: sha256_file(tmp / name) for name in written}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    write_bytes_atomic(run_dir / ADAPTER_FILE, (final / ADAPTER_FILE).read_bytes())
    return final


def read_optimizer_state(folder: Path) -> tuple[dict[str, np.ndarray], int] | None:
    """AdamW's moments and step count saved in a checkpoint folder (converted from an ORT checkpoint of
    a run made for the training API); None when the checkpoint holds none."""
    from safetensors import safe_open

    path = folder / OPTIMIZER_FILE
    if path.is_file():
        try:
            with safe_open(str(path), framework="numpy") as handle:
                step = int((handle.metadata() or {}).get("step", "0"))
                return {key: handle.get_tensor(key) for key in handle.keys()}, step
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise RunError(f"optimizer state {path} is not readable ({exc})", hint="resume from another checkpoint") from exc
    if (folder / ORT_CHECKPOINT).is_file():
        from .legacy_checkpoint import read_ort_checkpoint

        return read_ort_checkpoint(folder / ORT_CHECKPOINT).optimizer_state()
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be used, or None when it is intact."""
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{state_path.name} unreadable ({exc.__class__.__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        return f"{state_path.name} lacks the file hashes"
    for name, digest in state["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, newest (highest step) first; temporary folders are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)


def newest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint; damaged ones are skipped with a warning."""
    for folder in list_checkpoints(run_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("skipping damaged checkpoint %s: %s", folder, problem)
    return None


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))


def prune_checkpoints(run_dir: Path, keep: int, protect: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (never one in `protect`); returns what was removed."""
    removed = []
    for folder in list_checkpoints(run_dir)[max(keep, 1):]:
        if folder.resolve() in {p.resolve() for p in protect}:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    for leftover in (Path(run_dir) / CHECKPOINTS).glob(TEMP_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)  # a checkpoint that a killed process never finished
    return removed


def read_run(run_dir: Path | str) -> dict:
    """run.json of a run folder, with a user error if it is not one."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not an ortft run folder (no {RUN_FILE})", hint="pass the --out folder of `ortft train`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path} is damaged ({exc})", hint="the run folder cannot be used") from exc


def is_run_dir(path: Path | str) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def resolve_checkpoint(run_dir: Path | str, which: str = "latest") -> Path:
    """`latest`, `best`, or a path: the checkpoint folder to use, verified intact."""
    run_dir = Path(run_dir)
    read_run(run_dir)
    if which == "latest":
        folder = newest_valid_checkpoint(run_dir)
        if folder is None:
            raise RunError(f"run {run_dir} has no checkpoint to use (none saved yet, or every one damaged)", hint="train longer (checkpoints come every --save-every steps and at the end)")
        return folder
    if which == "best":
        best_path = run_dir / BEST_FILE
        if not best_path.is_file():
            raise RunError(f"run {run_dir} has no best checkpoint (no evaluation ran)", hint="use --checkpoint latest, or train with validation data")
        folder = run_dir / json.loads(best_path.read_text(encoding="utf-8"))["checkpoint"]
    else:
        folder = Path(which)
        if not folder.is_absolute() and not folder.exists():
            folder = run_dir / which
    if not folder.is_dir():
        raise RunError(f"checkpoint {folder} does not exist", hint="use latest, best, or a checkpoints/step-N folder")
    problem = checkpoint_problem(folder)
    if problem:
        raise RunError(f"checkpoint {folder} is damaged: {problem}", hint="use another checkpoint (latest skips damaged ones)")
    return folder


def write_best(run_dir: Path, checkpoint: Path, step: int, eval_loss: float) -> None:
    write_json_atomic(run_dir / BEST_FILE, {"checkpoint": str(checkpoint.relative_to(run_dir)), "step": step, "eval_loss": eval_loss})
