"""The run folder of `ortft train`: its layout, its checkpoints, and finding the newest valid one.

The functions here are the one place that resolves a run folder: its bundle (`run_bundle_dir`,
`trained_on`), its checkpoints (`resolve_checkpoint`, `resolve_run_checkpoint`, `newest_valid_checkpoint`)
and its recorded settings (`read_config`).

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
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapter import adapter_bytes
from .bundle import MANIFEST_NAME
from .config import BEST_CHECKPOINT, LATEST_CHECKPOINT
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


def optimizer_bytes(state: dict[str, np.ndarray], step: int) -> bytes:
    return adapter_bytes(state, {"step": str(int(step)), "optimizer": "adamw"})


def write_checkpoint(run_dir: Path, step: int, adapter: dict[str, np.ndarray], state: dict,
                     optimizer_state: dict[str, np.ndarray] | None = None, optimizer_step: int = 0) -> Path:
    """Write checkpoints/step-N atomically: adapter, optimizer state, then trainer_state with their hashes."""
    final = checkpoints_root(run_dir) / step_dir_name(step)
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
    """Why a checkpoint folder cannot be used, or None when it is intact: its trainer_state.json has the
    expected types and every file it lists is a regular file of the folder (no link) with that sha256."""
    from .json_types import check
    from .schemas import TRAINER_STATE
    from .trust import member_path

    if _is_link(folder):
        return "the folder is a symbolic link"
    state_path = folder / STATE_FILE
    try:
        if _is_link(state_path):
            return f"{state_path.name} is a symbolic link"
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{state_path.name} unreadable ({exc.__class__.__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        return f"{state_path.name} lacks the file hashes"
    try:
        check(state, TRAINER_STATE, str(state_path), RunError)
    except RunError as exc:
        return exc.message.split(": ", 1)[-1]
    for name, digest in state["files"].items():
        if not os.path.lexists(folder / name):
            return f"{name} missing"
        try:
            path = member_path(folder, name, RunError, "checkpoint")
        except RunError as exc:
            return exc.message.split(": ", 1)[-1]
        if sha256_file(path) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def checkpoints_root(run_dir: Path | str) -> Path:
    """RUN/checkpoints, refused when it is a symbolic link: ortft writes and prunes only inside the run folder."""
    root = Path(run_dir) / CHECKPOINTS
    if _is_link(root):
        raise RunError(f"{root} is a symbolic link; ortft writes and deletes checkpoints only inside the run folder",
                       hint="replace the link by a real folder (move the checkpoints into the run folder)")
    return root


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, newest (highest step) first; temporary folders are ignored."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and not _is_link(p) and p.is_dir()]
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
    """trainer_state.json of a checkpoint folder (`checkpoint_problem` has checked its types)."""
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))


def prune_checkpoints(run_dir: Path, keep: int, protect: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (never one in `protect`); returns what was removed."""
    removed = []
    for folder in list_checkpoints(run_dir)[max(keep, 1):]:  # real folders inside RUN/checkpoints only
        if folder.resolve() in {p.resolve() for p in protect}:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    for leftover in checkpoints_root(run_dir).glob(TEMP_PREFIX + "*"):
        if not _is_link(leftover):
            shutil.rmtree(leftover, ignore_errors=True)  # a checkpoint that a killed process never finished
    return removed


def read_run(run_dir: Path | str) -> dict:
    """run.json of a run folder, with a user error if it is not one."""
    from .json_types import check
    from .schemas import RUN_INFO

    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not an ortft run folder (no {RUN_FILE})", hint="pass the --out folder of `ortft train`")
    if _is_link(path):
        raise RunError(f"{path} is a symbolic link; ortft reads a run's files only inside the run folder", hint="copy the run folder anew")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path} is damaged ({exc})", hint="the run folder cannot be used") from exc
    check(info, RUN_INFO, str(path), RunError, hint="the run folder was edited or damaged")
    return info


def bundle_reference(run_dir: Path | str, bundle: Path | str) -> str:
    """How run.json names its bundle: relative to the run folder (the two can move together, and no host path
    is recorded), or absolute where no relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(Path(bundle).resolve(), Path(run_dir).resolve())).as_posix()
    except ValueError:
        return str(Path(bundle).resolve())


def run_bundle_dir(run_dir: Path | str, info: dict) -> Path:
    """The bundle folder run.json names: relative to the run folder, or absolute (runs made before)."""
    recorded = Path(info["bundle"])
    return recorded if recorded.is_absolute() else Path(run_dir) / recorded


def is_run_dir(path: Path | str) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def resolve_checkpoint(run_dir: Path | str, which: str = LATEST_CHECKPOINT) -> Path:
    """`latest`, `best`, or a path: the checkpoint folder to use, verified intact."""
    run_dir = Path(run_dir)
    read_run(run_dir)
    if which == LATEST_CHECKPOINT:
        folder = newest_valid_checkpoint(run_dir)
        if folder is None:
            raise RunError(f"run {run_dir} has no checkpoint to use (none saved yet, or every one damaged)", hint="train longer (checkpoints come every --save-every steps and at the end)")
        return folder
    if which == BEST_CHECKPOINT:
        best_path = run_dir / BEST_FILE
        if not best_path.is_file():
            raise RunError(f"run {run_dir} has no best checkpoint (no evaluation ran)", hint="use --checkpoint latest, or train with validation data")
        from .trust import member_path

        folder = member_path(run_dir, read_best(run_dir)["checkpoint"], RunError, "run", directory=True)
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


def read_best(run_dir: Path | str) -> dict:
    """best.json, checked: its checkpoint is a checkpoints/step-NNNNNNNN folder of this run."""
    from .json_types import check
    from .schemas import BEST

    path = Path(run_dir) / BEST_FILE
    if _is_link(path):
        raise RunError(f"{path} is a symbolic link; ortft reads a run's files only inside the run folder", hint="copy the run folder anew")
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path} is damaged ({exc.__class__.__name__})", hint="use --checkpoint latest") from exc
    check(best, BEST, str(path), RunError, hint="the run folder was edited or damaged; use --checkpoint latest")
    return best


def write_best(run_dir: Path, checkpoint: Path, step: int, eval_loss: float) -> None:
    write_json_atomic(run_dir / BEST_FILE, {"checkpoint": str(checkpoint.relative_to(run_dir)), "step": step, "eval_loss": eval_loss})


def read_config(run_dir: Path | str) -> dict:
    """config.json of a run folder, the settings it was trained with ({} when it has none)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path} is damaged ({exc}); cannot take the run's settings from it",
                       hint="give every setting on the command line, or start a new run") from exc
    return recorded if isinstance(recorded, dict) else {}


def trained_on(run_info: dict, bundle_dir: Path | str) -> bool:
    """Whether `bundle_dir` is the bundle run.json names by its manifest sha256 (also after `ortft upgrade`)."""
    from .manifest import bundle_digests

    return run_info.get("bundle_manifest_sha256") in bundle_digests(bundle_dir)


@dataclass(frozen=True)
class RunCheckpoint:
    """Where a run's bundle and the chosen checkpoint's adapter weights live."""

    run_dir: Path
    bundle_dir: Path
    checkpoint_dir: Path | None
    adapter_path: Path


def resolve_run_checkpoint(run_dir: Path | str, checkpoint: str = LATEST_CHECKPOINT) -> RunCheckpoint:
    """Read RUN_DIR/run.json and pick a checkpoint: `latest`, `best` or a path (folder or .safetensors).

    The bundle named in run.json must still have the manifest the run was trained on.
    """
    run_dir = Path(run_dir)
    run_info = read_run(run_dir)
    if not run_info.get("bundle"):
        raise RunError(f"{run_dir / RUN_FILE} does not name its bundle", hint="the run folder is damaged")
    bundle_dir = run_bundle_dir(run_dir, run_info)
    if not (bundle_dir / MANIFEST_NAME).is_file():
        raise RunError(
            f"{run_dir / RUN_FILE} names bundle {bundle_dir}, which has no {MANIFEST_NAME}",
            hint="move the bundle back to that path, or edit run.json to point at it",
        )
    if run_info.get("bundle_manifest_sha256") and not trained_on(run_info, bundle_dir):
        raise RunError(
            f"the bundle at {bundle_dir} is not the one run {run_dir} was trained on (manifest sha256 differs)",
            hint="point run.json at the original bundle",
        )
    checkpoint_dir, adapter_path = _choose_checkpoint(run_dir, checkpoint)
    return RunCheckpoint(run_dir, bundle_dir, checkpoint_dir, adapter_path)


def _choose_checkpoint(run_dir: Path, checkpoint: str) -> tuple[Path | None, Path]:
    """A checkpoint folder (verified against its recorded hashes) and its adapter; or a bare adapter file."""
    if checkpoint not in (LATEST_CHECKPOINT, BEST_CHECKPOINT):
        path = Path(checkpoint)
        candidate = path if path.is_absolute() or path.exists() else run_dir / path
        if candidate.is_file():
            return None, candidate
    folder = resolve_checkpoint(run_dir, checkpoint)
    return folder, folder / ADAPTER_FILE
