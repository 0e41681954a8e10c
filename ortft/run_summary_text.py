"""The summary a training run records at its end (summary.json, the last line of metrics.jsonl) in plain words.

`ortft report` prints these lines: how the run ended, its time, what each tokens/s figure counts, peak memory,
the provider, the training data's facts and the notes; never a Python repr (None, [], a dict).
"""

from __future__ import annotations

import math

LABEL_WIDTH = 17  # the report's label column: "best eval loss   "

# Keys the report shows from the metrics records themselves (losses), or that only mark the record.
_SHOWN_ELSEWHERE = ("event", "final_train_loss", "first_eval_loss", "best_eval_loss", "best_step")
_OWN_LINES = ("step", "total_steps", "finished", "stopped_by", "seconds", "train_seconds", "tokens_per_s", "peak_rss_mb",
              "provider", "nodes_per_provider", "data", "notes")

# The training data's facts (ortft/data.py DataStats), in the order and words the report uses.
DATA_FACTS = {
    "path": "file",
    "format": "format",
    "num_lines": "lines read",
    "num_examples": "examples trained on",
    "num_truncated": "examples cut to --seq-len",
    "num_without_labels": "examples dropped (no token left to learn from)",
    "num_tokens": "tokens (without padding)",
    "num_label_tokens": "tokens that carry loss",
    "longest_example_tokens": "longest example (tokens)",
    "fewer_examples_than_batch_size": "fewer examples than --batch-size",
}

TOKENS_EXPLAINED = (
    "tokens: the batches' tokens, padding excluded, prompts included",
    "time: each step's forward, backward and optimizer update; evaluations and checkpoints excluded",
)


def plain(value: object) -> str:
    """A JSON value in words: none, yes/no, numbers without float noise, lists joined, objects as key: value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return ", ".join(plain(item) for item in value) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {plain(item)}" for key, item in value.items()) if value else "none"
    return str(value)


def _line(label: str, text: str) -> str:
    return f"{label:<{LABEL_WIDTH - 1}s} {text}"


def _continued(text: str) -> str:
    return " " * LABEL_WIDTH + text


def outcome(totals: dict) -> str | None:
    """How the run ended: ran to the end, or stopped by what, at which step."""
    step, total = totals.get("step"), totals.get("total_steps")
    where = f"step {step} of {total}" if step is not None and total is not None else None
    if totals.get("finished") is True:
        return "ran to the end" + (f": {where}" if where else "")
    stopped_by = totals.get("stopped_by")
    if totals.get("finished") is False:
        reason = {"stop_after": "--stop-after", "SIGINT": "Ctrl-C (SIGINT)", "SIGTERM": "SIGTERM"}.get(stopped_by, plain(stopped_by))
        return (f"stopped by {reason}" + (f" at {where}" if where else "")
                + "; `ortft train ... --resume` continues from its checkpoint")
    return None


def speed_lines(totals: dict, mean_step_tokens_per_s: float | None) -> list[str]:
    """The two tokens/s figures, each said in words: the run's overall rate and the mean of the steps' rates."""
    lines = []
    rate, seconds = totals.get("tokens_per_s"), totals.get("train_seconds")
    if isinstance(rate, (int, float)) and isinstance(seconds, (int, float)) and seconds > 0:
        lines.append(f"{rate:.1f} overall: {round(rate * seconds):,} tokens in {seconds:.1f} s of training steps "
                     "in the last `ortft train` (slow steps weigh by their time)")
    if mean_step_tokens_per_s is not None:
        lines.append(f"{mean_step_tokens_per_s:.1f} mean of the steps' own rates (each step's tokens / its time; "
                     "every step counts the same)")
    if not lines:
        return []
    return [_line("tokens/s", lines[0]), *(_continued(text) for text in (*lines[1:], *TOKENS_EXPLAINED))]


def totals_lines(totals: dict, mean_step_tokens_per_s: float | None = None) -> list[str]:
    """Every line the report prints from a run's summary record (and the steps' mean rate)."""
    lines = []
    ended = outcome(totals)
    if ended:
        lines.append(_line("ended", ended))
    seconds, train_seconds = totals.get("seconds"), totals.get("train_seconds")
    if isinstance(seconds, (int, float)) and isinstance(train_seconds, (int, float)):
        lines.append(_line("time", f"{seconds:.1f} s in the training loop, {train_seconds:.1f} s of it in training steps "
                                   "(the rest: evaluations and checkpoints)"))
    lines.extend(speed_lines(totals, mean_step_tokens_per_s))
    if isinstance(totals.get("peak_rss_mb"), (int, float)):
        lines.append(_line("peak memory", f"{totals['peak_rss_mb']:.0f} MB resident (peak RSS of the process)"))
    if totals.get("provider") is not None:
        lines.append(_line("provider", plain(totals["provider"])))
    nodes = totals.get("nodes_per_provider")
    if isinstance(nodes, dict) and nodes:
        total = sum(count for count in nodes.values() if isinstance(count, int))
        lines.append(_line("graph nodes", ", ".join(f"{name} {plain(count)} of {total:,}" for name, count in nodes.items())))
    data = totals.get("data")
    if isinstance(data, dict) and data:
        lines.append("training data")
        lines.extend(f"  {DATA_FACTS.get(key, key)}: {plain(value)}" for key, value in data.items())
    notes = totals.get("notes")
    if isinstance(notes, list) and notes:
        lines.append("notes")
        lines.extend(f"  - {plain(note)}" for note in notes)
    elif "notes" in totals:
        lines.append(_line("notes", "none"))
    for key, value in totals.items():
        if key not in _SHOWN_ELSEWHERE and key not in _OWN_LINES:
            lines.append(_line(key.replace("_", " "), plain(value)))
    return lines
