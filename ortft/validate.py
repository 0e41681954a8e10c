"""`validate_bundle`: prove a bundle is intact and trainable before a device spends time on it.

Checks: manifest hashes; IR version and opsets that onnxruntime releases from 1.19 on read; no
training-only op left (stock onnxruntime runs both graphs); the trainable set equals the manifest's
and the initial adapter's; one synthetic training step gives a finite loss and finite gradients for
every trainable tensor, and the optimizer step changes them; with a frozen-prefix cache
(ortft/prefix_cache.py), its prefix and suffix graphs give the full eval graph's loss.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import GRAPH_FILES, INITIAL_ADAPTER, BundleManifest
from .errors import BundleError
from .manifest import load_verified, require_stock_runtime
from .runtime import GRAD_SUFFIX

MAX_IR_VERSION = 10  # onnxruntime 1.19 reads ONNX IR version <= 10; newer releases read these too
MAX_DEFAULT_OPSET = 21  # onnxruntime 1.19 implements the default domain up to opset 21
GRAPHS = GRAPH_FILES
REQUIRED_FILES = GRAPHS + (INITIAL_ADAPTER,)


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
    manifest = BundleManifest.of(manifest)
    rng = np.random.default_rng(seed)
    vocab = manifest.vocab_size
    input_ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    result = {
        "input_ids": input_ids,
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
    }
    if manifest.task == "seq-cls":
        result["labels"] = rng.integers(0, len(manifest.labels), size=(batch,), dtype=np.int64)
    elif manifest.task == "token-cls":
        result["labels"] = rng.integers(0, len(manifest.labels), size=(batch, seq), dtype=np.int64)
    else:
        result["labels"] = input_ids.copy()
    return result


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def check_standard_ops(bundle: Path) -> list[str]:
    """Training-only ops (which stock onnxruntime lacks) left in the bundle's graphs."""
    import onnx

    from .graph.lower_training_ops import training_only_ops

    problems = []
    for name in GRAPHS:
        left = training_only_ops(onnx.load(str(bundle / name), load_external_data=False))
        if left:
            problems.append(f"{name}: " + ", ".join(f"{op} x{count}" for (_domain, op), count in sorted(left.items())))
    return problems


def validate_bundle(bundle: Path | str, threads: int | None = None, train_step: bool = True) -> ValidationReport:
    from .runtime import TrainingSession

    bundle = Path(bundle)
    report = ValidationReport()
    manifest = load_verified(bundle)  # raises BundleError listing damaged files
    require_stock_runtime(bundle, manifest)
    report.add("manifest hashes", True, f"{len(manifest.files)} files match")
    from .tokenizer_facts import tokenizer_checks  # special tokens agree with the source; round trip

    report.checks.extend(tokenizer_checks(bundle, manifest))
    problems = check_graph_versions(bundle)
    report.add("IR version and opsets", not problems, "; ".join(problems) or f"IR <= {MAX_IR_VERSION}, opset <= {MAX_DEFAULT_OPSET}")
    problems = check_standard_ops(bundle)
    report.add("standard ONNX ops only", not problems, "; ".join(problems) or "no training-only op left")
    try:
        session = TrainingSession(bundle, threads=threads, manifest=manifest)
        graph_inputs = {value.name for value in session.train_session.get_inputs()}
        graph_outputs = {value.name for value in session.train_session.get_outputs()}
        session.eval_session
    except Exception as exc:  # ORT raises plain RuntimeError/Fail for unloadable graphs
        report.add("onnxruntime loads both graphs and the initial adapter", False, str(exc).splitlines()[0][:300])
        return report
    zeros = len(manifest.get("initial_adapter_zeros") or [])
    report.add("onnxruntime loads both graphs and the initial adapter", True, f"{len(session.trainable)} trainable tensors"
               + (f", {zeros} of them zeros the manifest lists (not stored)" if zeros else ""))
    expected = manifest.trainable_names
    missing_inputs = [name for name in expected if name not in graph_inputs]
    missing_grads = [name for name in expected if name + GRAD_SUFFIX not in graph_outputs]
    extra_grads = sorted(name for name in graph_outputs if name.endswith(GRAD_SUFFIX) and name[:-len(GRAD_SUFFIX)] not in expected)
    same = not (missing_inputs or missing_grads or extra_grads)
    detail = f"{len(expected)} trainable tensors, each an input with a gradient output" if same else (
        f"not graph inputs: {missing_inputs[:3]}; without gradient: {missing_grads[:3]}; gradients of others: {extra_grads[:3]}")
    report.add("trainable set equals manifest", same, detail)
    if not train_step or not same:
        return report
    batch = synthetic_batch(manifest)
    if manifest.get("prefix_cache"):  # the frozen-prefix cache's graphs compute what the full graphs do
        from .prefix_cache import cached_loss

        full = session.evaluate(batch)
        full = float(np.asarray(full[0] if isinstance(full, list) else full))
        cached = cached_loss(bundle, manifest, batch, threads)
        close = abs(cached - full) <= 1e-4 * abs(full)
        report.add("prefix cache graphs give the full graphs' loss", close, f"{cached:.6f} vs {full:.6f}")
    before = session.adapter()
    outputs = session.train_step_forward_backward(batch)
    loss = float(np.asarray(outputs[0] if isinstance(outputs, list) else outputs))
    grads = session.gradients()
    finite = all(np.isfinite(value).all() for value in grads.values())
    session.optimizer_step(1e-3)
    report.add("synthetic step gives a finite loss", bool(np.isfinite(loss)), f"loss {loss:.4f}")
    report.add("gradients are finite", finite, f"{len(grads)} gradients, norm {session.last_grad_norm:.4g}")
    changed_trainable = sum(not np.array_equal(session.parameter(name), value) for name, value in before.items())
    report.add("trainable parameters updated", changed_trainable > 0, f"{changed_trainable} of {len(before)} changed")
    frozen = manifest.get("frozen_weights") or {}
    report.add("frozen weights are constants of the graphs", True,
               f"{frozen.get('tensors', 0)} tensors in {frozen.get('file')}" if frozen else "none")
    return report


def require_valid(bundle: Path | str) -> BundleManifest:
    """For commands that consume a bundle: manifest + hashes, or a BundleError."""
    manifest = load_verified(bundle)
    require_stock_runtime(bundle, manifest)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleError(f"bundle {bundle} lacks {name}", hint="prepare the bundle again")
    return manifest
