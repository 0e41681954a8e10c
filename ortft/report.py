"""Reads a run's metrics.jsonl, summarizes it as text and plots loss and learning rate against step.

Used by `ortft report RUN_DIR`; matplotlib (the [plot] extra) is imported only when a plot is drawn.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
from pathlib import Path

from .errors import RunError, UserError
from .fsutil import write_bytes_atomic
from .run_summary_text import totals_lines

logger = logging.getLogger(__name__)

METRICS_FILE_NAME = "metrics.jsonl"
DEFAULT_PLOT_NAME = "loss_curve.png"


@dataclasses.dataclass
class MetricsLog:
    """The records of one metrics.jsonl, sorted into training, evaluation and summary records."""

    path: Path
    train_records: list[dict] = dataclasses.field(default_factory=list)
    eval_records: list[dict] = dataclasses.field(default_factory=list)
    summary_record: dict | None = None
    truncated_last_line: bool = False


@dataclasses.dataclass
class RunSummary:
    """The numbers `ortft report` prints; None where the run logged nothing to compute them from."""

    steps: int | None
    train_records: int
    first_loss: float | None
    last_loss: float | None
    min_loss: float | None
    min_loss_step: int | None
    best_eval_loss: float | None
    best_eval_loss_step: int | None
    eval_perplexity: float | None
    eval_perplexity_derived: bool
    best_eval_accuracy: float | None
    best_eval_accuracy_step: int | None
    eval_records: int
    mean_tokens_per_s: float | None
    run_totals: dict
    best_eval_f1: float | None = None  # token-cls: entity F1 (ortft/metrics.py)
    best_eval_f1_step: int | None = None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return _is_number(value) and math.isfinite(value)


def read_metrics(path: Path | str) -> MetricsLog:
    """Parse a metrics.jsonl; a truncated last line (a run killed mid-write) is skipped with a warning.

    Raises RunError if the file is missing, empty, holds a malformed line before the last, or holds
    no training or evaluation record.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise RunError(
            f"no metrics file at {path}",
            hint="pass the folder `ortft train --out` wrote (it holds metrics.jsonl)",
        ) from None
    except OSError as exc:
        raise RunError(f"cannot read metrics file {path}: {exc.strerror or exc}") from None
    numbered_lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not numbered_lines:
        raise RunError(
            f"metrics file {path} is empty",
            hint="the run logged nothing yet; let it reach its first logging step",
        )
    log = MetricsLog(path=path)
    last_number = numbered_lines[-1][0]
    for number, line in numbered_lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == last_number:
                logger.warning("%s:%d: skipping a truncated last line (the run stopped mid-write)", path, number)
                log.truncated_last_line = True
                continue
            raise RunError(
                f"{path}:{number}: not valid JSON ({exc.msg})",
                hint="fix or delete that line; every line must be one JSON object",
            ) from None
        if not isinstance(record, dict):
            if number == last_number:  # e.g. `{"step": 12` cut to `12`
                logger.warning("%s:%d: skipping a truncated last line (the run stopped mid-write)", path, number)
                log.truncated_last_line = True
                continue
            raise RunError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
        _sort_record(log, record)
    if not log.train_records and not log.eval_records:
        raise RunError(
            f"metrics file {path} holds no training or evaluation records",
            hint="training records carry step and loss; evaluation records carry step and eval_loss",
        )
    return log


def _sort_record(log: MetricsLog, record: dict) -> None:
    if record.get("event") == "summary":
        log.summary_record = record
        return
    if not _is_number(record.get("step")):
        return
    if _is_number(record.get("loss")):
        log.train_records.append(record)
    if any(_is_number(record.get(key)) for key in ("eval_loss", "eval_perplexity", "eval_accuracy")):
        log.eval_records.append(record)


def _best(records: list[dict], key: str, lowest: bool) -> tuple[float | None, int | None]:
    scored = [(record[key], record["step"]) for record in records if _is_finite_number(record.get(key))]
    if not scored:
        return None, None
    value, step = (min if lowest else max)(scored, key=lambda pair: pair[0])
    return float(value), int(step)


def summarize(log: MetricsLog) -> RunSummary:
    """Compute the report's numbers from the parsed records."""
    train = sorted(log.train_records, key=lambda record: record["step"])
    losses = [float(record["loss"]) for record in train]
    min_loss, min_loss_step = _best(train, "loss", lowest=True)
    best_eval_loss, best_eval_loss_step = _best(log.eval_records, "eval_loss", lowest=True)
    best_eval_accuracy, best_eval_accuracy_step = _best(log.eval_records, "eval_accuracy", lowest=False)
    best_eval_f1, best_eval_f1_step = _best(log.eval_records, "eval_f1", lowest=False)

    eval_perplexity, perplexity_derived = None, False
    if best_eval_loss_step is not None:
        at_best = [r for r in log.eval_records if r["step"] == best_eval_loss_step and r.get("eval_loss") == best_eval_loss]
        logged = at_best[0].get("eval_perplexity") if at_best else None
        if _is_finite_number(logged):
            eval_perplexity = float(logged)
        elif best_eval_loss < 700:  # exp overflows a float beyond ~709
            eval_perplexity, perplexity_derived = math.exp(best_eval_loss), True
    else:
        eval_perplexity, _ = _best(log.eval_records, "eval_perplexity", lowest=True)

    speeds = [float(r["tokens_per_s"]) for r in train if _is_finite_number(r.get("tokens_per_s"))]
    all_steps = [int(r["step"]) for r in train + log.eval_records]
    return RunSummary(
        steps=max(all_steps) if all_steps else None,
        train_records=len(train),
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        min_loss=min_loss,
        min_loss_step=min_loss_step,
        best_eval_loss=best_eval_loss,
        best_eval_loss_step=best_eval_loss_step,
        eval_perplexity=eval_perplexity,
        eval_perplexity_derived=perplexity_derived,
        best_eval_accuracy=best_eval_accuracy,
        best_eval_accuracy_step=best_eval_accuracy_step,
        eval_records=len(log.eval_records),
        mean_tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
        run_totals={k: v for k, v in (log.summary_record or {}).items() if k != "event"},
        best_eval_f1=best_eval_f1,
        best_eval_f1_step=best_eval_f1_step,
    )


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def format_summary(summary: RunSummary, metrics_path: Path | None = None) -> str:
    """The text summary printed to stdout, one fact per line."""
    lines = []
    if metrics_path is not None:
        lines.append(f"metrics          {metrics_path}")
    lines.append(f"steps            {summary.steps if summary.steps is not None else '-'}"
                 f" ({summary.train_records} training records, {summary.eval_records} evaluations)")
    lines.append(f"train loss       first {_number(summary.first_loss)}  last {_number(summary.last_loss)}  "
                 f"min {_number(summary.min_loss)}"
                 + (f" (step {summary.min_loss_step})" if summary.min_loss_step is not None else ""))
    if summary.best_eval_loss is not None:
        lines.append(f"best eval loss   {_number(summary.best_eval_loss)} (step {summary.best_eval_loss_step})")
    if summary.eval_perplexity is not None:
        note = " (exp of best eval loss)" if summary.eval_perplexity_derived else ""
        lines.append(f"eval perplexity  {_number(summary.eval_perplexity, 3)}{note}")
    if summary.best_eval_accuracy is not None:
        lines.append(f"best eval acc.   {_number(summary.best_eval_accuracy)} (step {summary.best_eval_accuracy_step})")
    if summary.best_eval_f1 is not None:
        lines.append(f"best entity F1   {_number(summary.best_eval_f1)} (step {summary.best_eval_f1_step})")
    if not summary.run_totals:
        lines.append("ended            not recorded: the run is still going, or was killed before its end")
    lines.extend(totals_lines(summary.run_totals, summary.mean_tokens_per_s))
    return "\n".join(lines)


def _import_matplotlib_agg():
    """Import matplotlib's Figure and Agg canvas without pyplot (no global backend state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError(
            "plotting needs matplotlib, which is not installed",
            hint="install the [plot] extra: pip install 'ortft[plot]'",
        ) from None
    return Figure, FigureCanvasAgg, MaxNLocator


def render_png(log: MetricsLog, title: str | None = None) -> bytes:
    """Draw loss (training line, evaluation markers) and learning rate against step; return PNG bytes.

    `title` names the run above both plots; each plot's own title says what it shows."""
    Figure, FigureCanvasAgg, MaxNLocator = _import_matplotlib_agg()
    figure = Figure(figsize=(8, 6.5), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})

    train = sorted(log.train_records, key=lambda record: record["step"])
    if train:
        loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1.2)
    evals = sorted(log.eval_records, key=lambda record: record["step"])
    with_eval_loss = [r for r in evals if _is_number(r.get("eval_loss"))]
    if with_eval_loss:
        loss_axes.plot([r["step"] for r in with_eval_loss], [r["eval_loss"] for r in with_eval_loss],
                       "o--", color="tab:red", label="eval loss", markersize=5)
    with_accuracy = [r for r in evals if _is_number(r.get("eval_accuracy"))]
    if with_accuracy:
        accuracy_axes = loss_axes.twinx()
        accuracy_axes.plot([r["step"] for r in with_accuracy], [r["eval_accuracy"] for r in with_accuracy],
                           "s:", color="tab:green", label="eval accuracy", markersize=5)
        accuracy_axes.set_ylabel("eval accuracy")
        accuracy_axes.legend(loc="upper center")
    loss_axes.set_ylabel("loss")
    loss_axes.grid(True, alpha=0.3)
    if train or with_eval_loss:
        loss_axes.legend(loc="upper right")
    loss_axes.set_title("training loss per step" + (", validation loss at each evaluation" if with_eval_loss else "")
                        + (", validation accuracy" if with_accuracy else ""), fontsize=10)
    figure.suptitle(title or "training run")

    with_lr = [r for r in train if _is_number(r.get("lr"))]
    if with_lr:
        lr_axes.plot([r["step"] for r in with_lr], [r["lr"] for r in with_lr], color="tab:purple", linewidth=1.2)
    else:
        lr_axes.text(0.5, 0.5, "no learning-rate records", ha="center", va="center", transform=lr_axes.transAxes)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_title("learning rate per step", fontsize=10)
    lr_axes.set_xlabel("step")
    lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_axes.grid(True, alpha=0.3)
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def metrics_path_for(run_path: Path | str) -> Path:
    """RUN_DIR/metrics.jsonl, or the path itself when it names a metrics file directly."""
    run_path = Path(run_path)
    if run_path.is_file():
        return run_path
    if not run_path.exists():
        raise RunError(f"run folder {run_path} does not exist", hint="pass the folder `ortft train --out` wrote")
    return run_path / METRICS_FILE_NAME


def plot_title(run_path: Path | str) -> str:
    """The plot's title: the run folder as the user named it, with its parent folder when only its name was given
    (`run` in /tmp/demo: demo/run); the last three parts of a long path."""
    run_path = Path(run_path)
    if run_path.is_file() or run_path.name == METRICS_FILE_NAME:
        run_path = run_path.parent
    if len(run_path.parts) < 2:
        run_path = Path(*run_path.resolve().parts[-2:])
    shown = str(run_path)
    if len(shown) > 60 and len(run_path.parts) > 3:
        shown = ".../" + "/".join(run_path.parts[-3:])
    return f"{shown}: loss and learning rate by step"


def write_plot(log: MetricsLog, out_path: Path | str, run_path: Path | str | None = None) -> Path:
    """Render the plot (titled after `run_path`, else the metrics file's folder) and write it atomically
    (temporary name in the same folder, then rename)."""
    out_path = Path(out_path)
    png_bytes = render_png(log, title=plot_title(run_path if run_path is not None else log.path.parent))
    write_bytes_atomic(out_path, png_bytes)
    return out_path
