"""`ortft report RUN_DIR`: prints a run's summary and plots its loss and learning-rate curves to a PNG.

Example: `ortft report runs/chat-lora --out loss.png` (the plot needs the [plot] extra: matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_paths import InputPath


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_png",
    type=InputPath("name the PNG file to write, not a folder", exists=False, dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the plot [default: RUN_DIR/loss_curve.png].",
)
def command(run_dir: Path, out_png: Path | None) -> None:
    """Summarize RUN_DIR/metrics.jsonl and plot loss and learning rate against step."""
    from ..report import DEFAULT_PLOT_NAME, format_summary, metrics_path_for, read_metrics, summarize, write_plot

    metrics_path = metrics_path_for(run_dir)
    log = read_metrics(metrics_path)
    click.echo(format_summary(summarize(log), metrics_path))
    target = out_png if out_png is not None else metrics_path.parent / DEFAULT_PLOT_NAME
    written = write_plot(log, target, run_path=run_dir)
    click.echo(f"plot             {written}")
