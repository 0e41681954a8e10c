"""What the ServerApp checks in every node's reply before it aggregates or records anything of it.

The server does not control the devices, so a reply may hold anything. A training reply must carry exactly
one ArrayRecord `arrays` with exactly the bundle's trainable tensors (float32, their shapes, finite values),
an update (reply minus the global adapter it was sent) whose L2 norm is within `max_update_norm`, and a
MetricRecord `metrics` whose `num-examples` is a whole number in 1..`max_examples` and whose `train-loss`
and other values are finite and sane. An evaluation reply must carry a finite, non-negative `eval-loss`
at most `MAX_LOSS`, and whole-number `eval-tokens` and `num-examples` within bounds. A reply that fails is
that node's failure for the round (its reason recorded); the round goes on with the others.
Numpy only (the Flower records are read through their own accessors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_LOSS = 1e4  # a cross-entropy above this is no loss a language model reports (ln(vocab) is ~11 for 50k tokens)
MAX_EVAL_TOKENS = 10**10
# The default update bound: AdamW moves an element by about lr per step (bias-corrected moments; rarely up to ~3x),
# so ||update|| <= steps * lr * sqrt(parameters) * ~3; this factor leaves room for a node that runs more local steps.
UPDATE_NORM_SLACK = 10.0
NPY_HEADER_ROOM = 1 << 16  # an .npy header is at most 64 KiB
TRAIN_CONTENT = {"arrays", "metrics", "node"}
EVAL_CONTENT = {"metrics", "node"}


@dataclass(frozen=True)
class ReplyLimits:
    """Bounds a reply must keep: the update's L2 norm and the number of examples a node may claim."""

    max_update_norm: float
    max_examples: int

    @classmethod
    def for_run(cls, max_update_norm: float, max_examples: int, local_steps: int, lr: float, parameters: int) -> ReplyLimits:
        """`max_update_norm` <= 0 means automatic: UPDATE_NORM_SLACK * local_steps * lr * sqrt(parameters)."""
        if max_update_norm <= 0:
            max_update_norm = UPDATE_NORM_SLACK * local_steps * lr * math.sqrt(max(parameters, 1))
        return cls(float(max_update_norm), int(max_examples))


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_values(metrics) -> str | None:
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return f"metric {key!r} is not a finite number"
    return None


def _content_problem(reply, allowed: set[str]) -> str | None:
    content = reply.content
    extra = sorted(set(content.keys()) - allowed)
    if extra:
        return f"unexpected records {extra}"
    if "metrics" not in content.metric_records:
        return "no MetricRecord 'metrics'"
    if "node" in content and "node" not in content.config_records:
        return "'node' is not a ConfigRecord"
    return _finite_values(content.metric_records["metrics"])


def _count_problem(metrics, key: str, low: int, high: int) -> str | None:
    value = metrics.get(key)
    if not _is_whole(value) or not low <= value <= high:
        return f"{key} is {value!r}, not a whole number in {low}..{high}"
    return None


def _loss_problem(metrics, key: str) -> str | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_LOSS:
        return f"{key} is {value!r}, not a loss in 0..{MAX_LOSS:g}"
    return None


def read_arrays(record, shapes: dict[str, list[int]]) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(the adapter, None) when an ArrayRecord holds exactly the tensors `shapes` names ({name: shape}), float32, with
    those shapes, finite; else (None, what is wrong). Sizes are checked before any tensor is decoded."""
    names = list(record.keys())
    missing = [name for name in shapes if name not in record]
    extra = [name for name in names if name not in shapes]
    if missing or extra:
        return None, f"tensors missing {missing[:3]} or not the bundle's {extra[:3]}"
    arrays = {}
    for name, shape in shapes.items():
        array, shape = record[name], list(shape)
        if getattr(array, "dtype", None) != "float32" or list(getattr(array, "shape", [])) != shape:
            return None, f"tensor {name} is {getattr(array, 'dtype', '?')} {list(getattr(array, 'shape', []))}, expected float32 {shape}"
        if len(getattr(array, "data", b"")) > math.prod(shape) * 4 + NPY_HEADER_ROOM:  # before numpy() allocates what it claims
            return None, f"tensor {name} carries {len(array.data)} bytes, more than a float32 {shape} needs"
        try:
            value = array.numpy()
        except (TypeError, ValueError, OSError, EOFError) as exc:
            return None, f"tensor {name} cannot be read ({exc.__class__.__name__})"
        if value.dtype != np.float32 or list(value.shape) != shape:
            return None, f"tensor {name} holds {value.dtype} {list(value.shape)}, not what its header says"
        if not np.isfinite(value).all():
            return None, f"tensor {name} holds NaN or an infinite value"
        arrays[name] = value
    return arrays, None


def _arrays_problem(record, global_adapter: dict[str, np.ndarray], limits: ReplyLimits) -> str | None:
    arrays, problem = read_arrays(record, {name: list(value.shape) for name, value in global_adapter.items()})
    if problem:
        return problem
    squared = 0.0
    for name, expected in global_adapter.items():
        delta = arrays[name].astype(np.float64) - expected.astype(np.float64)
        squared += float(np.dot(delta.ravel(), delta.ravel()))
    norm = math.sqrt(squared)
    if not norm <= limits.max_update_norm:
        return f"its update has L2 norm {norm:.4g}, above max-update-norm {limits.max_update_norm:.4g}"
    return None


def train_reply_problem(reply, global_adapter: dict[str, np.ndarray], limits: ReplyLimits) -> str | None:
    """Why a training reply must not be aggregated, or None when it is fit to."""
    problem = _content_problem(reply, TRAIN_CONTENT)
    if problem:
        return problem
    if "arrays" not in reply.content.array_records or len(reply.content.array_records) != 1:
        return "not exactly one ArrayRecord 'arrays'"
    metrics = reply.content.metric_records["metrics"]
    return (_count_problem(metrics, "num-examples", 1, limits.max_examples) or _loss_problem(metrics, "train-loss")
            or _arrays_problem(reply.content.array_records["arrays"], global_adapter, limits))


def eval_reply_problem(reply, limits: ReplyLimits) -> str | None:
    """Why an evaluation reply must not be counted, or None when it is fit to."""
    problem = _content_problem(reply, EVAL_CONTENT)
    if problem:
        return problem
    if reply.content.array_records:
        return "an evaluation reply carries arrays"
    metrics = reply.content.metric_records["metrics"]
    return (_count_problem(metrics, "num-examples", 1, limits.max_examples) or _count_problem(metrics, "eval-tokens", 1, MAX_EVAL_TOKENS)
            or _loss_problem(metrics, "eval-loss"))


def screen(replies: list, problem_of, node_name) -> tuple[list, list[dict]]:
    """(replies fit to use, failures {node, node_id, reason}) of a round's good replies."""
    kept, failures = [], []
    for reply in replies:
        problem = problem_of(reply)
        if problem is None:
            kept.append(reply)
        else:
            node_id = reply.metadata.src_node_id
            failures.append({"node": node_name(reply), "node_id": node_id, "reason": f"reply refused: {problem}"})
    return kept, failures
