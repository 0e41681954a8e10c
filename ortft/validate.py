"""`validate_bundle`: prove a bundle is intact and trainable before a device spends time on it.

Checks: manifest hashes; IR version and opsets ORT 1.19.2 accepts; ORT loads the three graphs and
the checkpoint; the trainable set equals the manifest's; one synthetic training step gives a finite
loss and changes only trainable parameters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BundleError
from .manifest import load_verified

MAX_IR_VERSION = 10  # ORT 1.19 reads ONNX IR version <= 10
MAX_DEFAULT_OPSET = 21  # ORT 1.19 implements the default domain up to opset 21
GRAPHS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")


@dataclass
class ValidationReport:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _name, ok, _detail in self.checks)


def check_graph_versions(bundle: Path) -> list[str]:
    import onnx

    problems = []
    for name in GRAPHS:
        model = onnx.load(str(bundle / name), load_external_data=False)
        if model.ir_version > MAX_IR_VERSION:
            problems.append(f"{name}: IR version {model.ir_version} > {MAX_IR_VERSION}")
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version > MAX_DEFAULT_OPSET:
                problems.append(f"{name}: opset {opset.version} > {MAX_DEFAULT_OPSET}")
    return problems


def synthetic_batch(manifest: dict, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    """A valid random batch for the bundle's graph inputs (every position labelled)."""
    rng = np.random.default_rng(seed)
    vocab = int(manifest["model"]["vocab_size"])
    input_ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    result = {
        "input_ids": input_ids,
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
    }
    if manifest["task"] == "seq-cls":
        result["labels"] = rng.integers(0, len(manifest["labels"]), size=(batch,), dtype=np.int64)
    else:
        result["labels"] = input_ids.copy()
    return result


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def validate_bundle(bundle: Path | str, threads: int | None = None, train_step: bool = True) -> ValidationReport:
    from .runtime import TrainingSession

    bundle = Path(bundle)
    report = ValidationReport()
    manifest = load_verified(bundle)  # raises BundleError listing damaged files
    report.add("manifest hashes", True, f"{len(manifest['files'])} files match")
    problems = check_graph_versions(bundle)
    report.add("IR version and opsets", not problems, "; ".join(problems) or f"IR <= {MAX_IR_VERSION}, opset <= {MAX_DEFAULT_OPSET}")
    try:
        session = TrainingSession(bundle, threads=threads)
    except Exception as exc:  # ORT raises plain RuntimeError/Fail for unloadable graphs
        report.add("ORT loads graphs and checkpoint", False, str(exc).splitlines()[0][:300])
        return report
    report.add("ORT loads graphs and checkpoint", True, f"{len(session.parameter_names())} parameters")
    expected = {entry["name"] for entry in manifest["trainable"]}
    actual = set(session.trainable_names())
    same = expected == actual
    detail = f"{len(actual)} trainable tensors" if same else (
        f"only in manifest: {sorted(expected - actual)[:3]}; only in checkpoint: {sorted(actual - expected)[:3]}")
    report.add("trainable set equals manifest", same, detail)
    if not train_step:
        return report
    batch = synthetic_batch(manifest)
    frozen_before = {name: _digest(session.parameter(name)) for name in session.parameter_names() if name not in actual}
    trainable_before = {name: session.parameter(name).copy() for name in actual}
    outputs = session.train_step_forward_backward(batch)
    loss = float(np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs))
    session.optimizer_step(1e-3)
    report.add("synthetic step gives a finite loss", bool(np.isfinite(loss)), f"loss {loss:.4f}")
    changed_frozen = [name for name, digest in frozen_before.items() if _digest(session.parameter(name)) != digest]
    in_graph = manifest.get("frozen_weights") or {}
    unchanged = f"{len(frozen_before)} frozen in the checkpoint" + (
        f", {in_graph.get('tensors', 0)} constants of the graphs ({in_graph.get('file')})" if in_graph else "")
    report.add("frozen parameters unchanged", not changed_frozen, ", ".join(changed_frozen[:3]) or unchanged)
    changed_trainable = sum(not np.array_equal(session.parameter(name), value) for name, value in trainable_before.items())
    report.add("trainable parameters updated", changed_trainable > 0, f"{changed_trainable} of {len(actual)} changed")
    return report


def require_valid(bundle: Path | str) -> dict:
    """For commands that consume a bundle: manifest + hashes, or a BundleError."""
    manifest = load_verified(bundle)
    for name in GRAPHS + ("checkpoint",):
        if name not in manifest["files"]:
            raise BundleError(f"bundle {bundle} lacks {name}", hint="prepare the bundle again")
    return manifest
