"""Tests for `ortft report`: metrics.jsonl parsing, the text summary, the PNG plot and its error messages.

A synthetic metrics file with known numbers stands in for a real training run.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ortft import report
from ortft.cli import cli, main
from ortft.errors import RunError, UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
ORTFT_SCRIPT = next(
    (path for path in (Path(sys.executable).parent / "ortft", REPO_ROOT / ".venv" / "bin" / "ortft") if path.exists()),
    REPO_ROOT / ".venv" / "bin" / "ortft",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_synthetic_metrics(run_dir: Path, truncated_tail: bool = False) -> Path:
    """10 training steps (loss 3.0 - 0.2*step, except a spike at step 7) and evals at steps 5 and 10."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 11):
        loss = 5.0 if step == 7 else 3.0 - 0.2 * step
        lines.append({"step": step, "loss": loss, "lr": 1e-4 * step, "tokens_per_s": 100.0 * step})
        if step == 5:
            lines.append({"step": 5, "eval_loss": 1.5, "eval_perplexity": math.exp(1.5)})
        if step == 10:
            lines.append({"step": 10, "eval_loss": 1.8, "eval_perplexity": math.exp(1.8)})
    lines.append({"event": "summary", "total_steps": 10, "elapsed_s": 42.0})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if truncated_tail:
        text += '{"step": 11, "loss": 0.9, "lr'
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text(text, encoding="utf-8")
    return metrics_path


def run_main(argv: list[str]) -> int:
    """Call ortft.cli.main in-process and return its exit code (0 when it returns normally)."""
    try:
        main(argv)
    except SystemExit as exit_signal:
        return exit_signal.code or 0
    return 0


def assert_valid_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)
    assert data[12:16] == b"IHDR"


def test_summary_numbers_for_synthetic_run(tmp_path):
    log = report.read_metrics(write_synthetic_metrics(tmp_path / "run"))
    summary = report.summarize(log)
    assert summary.steps == 10
    assert summary.train_records == 10
    assert summary.first_loss == pytest.approx(2.8)
    assert summary.last_loss == pytest.approx(1.0)
    assert summary.min_loss == pytest.approx(1.0)
    assert summary.min_loss_step == 10
    assert summary.best_eval_loss == pytest.approx(1.5)
    assert summary.best_eval_loss_step == 5
    assert summary.eval_perplexity == pytest.approx(math.exp(1.5))
    assert not summary.eval_perplexity_derived
    assert summary.mean_tokens_per_s == pytest.approx(550.0)
    assert summary.run_totals == {"total_steps": 10, "elapsed_s": 42.0}


def test_perplexity_is_derived_when_not_logged_and_accuracy_is_reported(tmp_path):
    metrics_path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 50},
        {"step": 1, "eval_loss": 2.0, "eval_accuracy": 0.5},
        {"step": 2, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 70},
        {"step": 2, "eval_loss": 1.0, "eval_accuracy": 0.75},
    ]
    metrics_path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    summary = report.summarize(report.read_metrics(metrics_path))
    assert summary.eval_perplexity == pytest.approx(math.e)
    assert summary.eval_perplexity_derived
    assert summary.best_eval_accuracy == pytest.approx(0.75)
    assert summary.best_eval_accuracy_step == 2
    assert "(exp of best eval loss)" in report.format_summary(summary)


def test_token_cls_best_entity_f1_is_reported(tmp_path):
    metrics_path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 50},
        {"step": 1, "eval_loss": 1.0, "eval_accuracy": 0.8, "eval_precision": 0.5, "eval_recall": 0.6, "eval_f1": 0.55},
        {"step": 2, "eval_loss": 1.2, "eval_accuracy": 0.85, "eval_precision": 0.7, "eval_recall": 0.7, "eval_f1": 0.7},
    ]
    metrics_path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    summary = report.summarize(report.read_metrics(metrics_path))
    assert (summary.best_eval_f1, summary.best_eval_f1_step) == (pytest.approx(0.7), 2)
    assert "best entity F1   0.7000 (step 2)" in report.format_summary(summary)


def test_cli_writes_png_and_prints_summary(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_synthetic_metrics(run_dir)
    assert run_main(["report", str(run_dir)]) == 0
    output = capsys.readouterr().out
    assert_valid_png(run_dir / "loss_curve.png")
    assert "steps            10 (10 training records, 2 evaluations)" in output
    assert "first 2.8000  last 1.0000  min 1.0000 (step 10)" in output
    assert "best eval loss   1.5000 (step 5)" in output
    assert f"eval perplexity  {math.exp(1.5):.3f}" in output
    assert "550.0 mean of the steps' own rates" in output
    assert "elapsed s        42" in output  # a key this ortft does not know, in words
    assert "ended            ran to the end" not in output  # the synthetic summary says nothing about how it ended
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".ortft-tmp-")]
    assert leftovers == []


def test_cli_out_option_and_truncated_last_line(tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    write_synthetic_metrics(run_dir, truncated_tail=True)
    out_png = tmp_path / "plots" / "curve.png"
    with caplog.at_level(logging.WARNING, logger="ortft.report"):
        assert run_main(["report", str(run_dir), "--out", str(out_png)]) == 0
    assert_valid_png(out_png)
    assert not (run_dir / "loss_curve.png").exists()
    assert "truncated last line" in caplog.text and "metrics.jsonl:14" in caplog.text
    assert "steps            10" in capsys.readouterr().out


def test_malformed_middle_line_names_file_and_line(tmp_path):
    metrics_path = write_synthetic_metrics(tmp_path)
    lines = metrics_path.read_text().splitlines()
    lines[2] = "{not json"
    metrics_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=r"metrics\.jsonl:3: not valid JSON"):
        report.read_metrics(metrics_path)


@pytest.mark.parametrize(
    "content, expected",
    [(None, "no metrics file at"), ("", "is empty"), ("\n  \n", "is empty"),
     ('{"event": "summary"}\n', "no training or evaluation records")],
)
def test_unusable_metrics_files_are_run_errors(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(RunError, match=expected) as caught:
        report.read_metrics(tmp_path / "metrics.jsonl")
    assert str(tmp_path / "metrics.jsonl") in caught.value.message


@pytest.mark.parametrize("make_run", ["missing_file", "empty_file", "missing_dir"])
def test_cli_errors_exit_2_with_message_and_no_traceback(tmp_path, make_run):
    run_dir = tmp_path / "run"
    if make_run != "missing_dir":
        run_dir.mkdir()
    if make_run == "empty_file":
        (run_dir / "metrics.jsonl").write_text("")
    completed = subprocess.run(
        [str(ORTFT_SCRIPT), "report", str(run_dir)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("error: ")
    assert str(run_dir) in completed.stderr
    assert not (run_dir / "loss_curve.png").exists()


def test_missing_matplotlib_prints_summary_first_then_asks_for_plot_extra(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    write_synthetic_metrics(run_dir)
    for module_name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module_name, None)
    with pytest.raises(UserError, match="matplotlib") as caught:
        cli.main(args=["report", str(run_dir)], prog_name="ortft", standalone_mode=False)
    assert "[plot]" in caught.value.hint
    assert "best eval loss   1.5000 (step 5)" in capsys.readouterr().out
    assert not (run_dir / "loss_curve.png").exists()
    assert run_main(["report", str(run_dir)]) == 2
    assert "install the [plot] extra" in capsys.readouterr().err


def _real_summary(**changes) -> dict:
    """A summary record as `ortft train` writes it (ortft/train.py)."""
    record = {
        "event": "summary", "step": 40, "total_steps": 120, "finished": False, "stopped_by": "stop_after",
        "final_train_loss": 1.2, "first_eval_loss": 2.0, "best_eval_loss": 1.5, "best_step": 40, "seconds": 95.25,
        "train_seconds": 80.0, "tokens_per_s": 612.5, "peak_rss_mb": 1891.4, "provider": "cpu", "nodes_per_provider": None,
        "data": {"path": "train.jsonl", "format": "chat", "num_lines": 400, "num_examples": 360, "num_truncated": 2,
                 "num_without_labels": 0, "num_tokens": 52311, "num_label_tokens": 12000, "longest_example_tokens": 412,
                 "fewer_examples_than_batch_size": False},
        "notes": [],
    }
    record.update(changes)
    return record


def _report_text(tmp_path, summary_record: dict) -> str:
    metrics_path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 500.0}, {"step": 2, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 700.0},
               summary_record]
    metrics_path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return report.format_summary(report.summarize(report.read_metrics(metrics_path)))


@pytest.mark.parametrize("changes, ended", [
    ({}, "stopped by --stop-after at step 40 of 120; `ortft train ... --resume` continues from its checkpoint"),
    ({"stopped_by": "SIGINT"}, "stopped by Ctrl-C (SIGINT) at step 40 of 120"),
    ({"stopped_by": "SIGTERM"}, "stopped by SIGTERM at step 40 of 120"),
    ({"finished": True, "stopped_by": None, "step": 120}, "ran to the end: step 120 of 120"),
])
def test_summary_is_in_words_without_python_reprs(tmp_path, changes, ended):
    text = _report_text(tmp_path, _real_summary(**changes))
    assert f"ended            {ended}" in text
    for repr_text in ("None", "True", "False", "[]", "{", "}", "{'", "': "):
        assert repr_text not in text, (repr_text, text)
    assert "time             95.2 s in the training loop, 80.0 s of it in training steps" in text
    assert "peak memory      1891 MB" in text and "provider         cpu" in text
    lines = text.splitlines()
    data = lines[lines.index("training data") + 1:]
    assert data[:4] == ["  file: train.jsonl", "  format: chat", "  lines read: 400", "  examples trained on: 360"]
    assert "  examples cut to --seq-len: 2" in data and "  tokens (without padding): 52,311" in data
    assert "  fewer examples than --batch-size: no" in data
    assert "notes            none" in text


def test_each_tokens_per_s_figure_says_what_it_counts(tmp_path):
    text = _report_text(tmp_path, _real_summary())
    lines = text.splitlines()
    first = next(index for index, line in enumerate(lines) if line.startswith("tokens/s"))
    assert lines[first] == ("tokens/s         612.5 overall: 49,000 tokens in 80.0 s of training steps in the last "
                            "`ortft train` (slow steps weigh by their time)")
    assert lines[first + 1].strip() == "600.0 mean of the steps' own rates (each step's tokens / its time; every step counts the same)"
    assert "padding excluded, prompts included" in lines[first + 2]
    assert "evaluations and checkpoints excluded" in lines[first + 3]


def test_notes_nodes_and_a_run_without_summary(tmp_path):
    text = _report_text(tmp_path, _real_summary(notes=["only 3 training examples", "a second note"],
                                                nodes_per_provider={"OpenVINOExecutionProvider": 900, "CPUExecutionProvider": 100}))
    lines = text.splitlines()
    assert lines[lines.index("notes") + 1:lines.index("notes") + 3] == ["  - only 3 training examples", "  - a second note"]
    assert "graph nodes      OpenVINOExecutionProvider 900 of 1,000, CPUExecutionProvider 100 of 1,000" in text
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tokens_per_s": 500.0}) + "\n")
    text = report.format_summary(report.summarize(report.read_metrics(unfinished / "metrics.jsonl")))
    assert "ended            not recorded: the run is still going, or was killed before its end" in text


def test_plot_is_titled_with_the_run_and_what_it_plots(tmp_path, monkeypatch):
    run_dir = tmp_path / "experiments" / "run"
    write_synthetic_metrics(run_dir)
    titles = []
    monkeypatch.setattr(report, "render_png", lambda log, title=None: titles.append(title) or b"png")
    monkeypatch.chdir(tmp_path)
    assert run_main(["report", "experiments/run"]) == 0
    monkeypatch.chdir(tmp_path / "experiments")
    assert run_main(["report", "run"]) == 0
    assert titles == ["experiments/run: loss and learning rate by step"] * 2
    long_path = Path("/a/very/long/path/that/goes/on/and/on/and/on/and/on/for/ever/runs/chat-lora")
    assert report.plot_title(long_path) == ".../ever/runs/chat-lora: loss and learning rate by step"
