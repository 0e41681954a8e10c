"""`ortft predict`: label each line of a JSONL file with a seq-cls model, or tag its entities with a token-cls
model (a run folder or a merged-onnx export); one JSON line out per line in.

Predictions go to stdout, or to --out (written complete, then renamed into place); counts go to stderr.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_paths import InputPath
from ..config import PredictConfig
from ..providers import provider_option

_defaults = PredictConfig()


@click.command("predict")
@click.argument("model_dir", metavar="RUN_OR_EXPORT", type=InputPath(
    "pass a seq-cls or token-cls run folder (`ortft train --out`) or its merged-onnx export (`ortft export --out`)",
    file_okay=False))
@click.option("--data", required=True, type=InputPath('pass a JSONL file, one {"text": ...} or {"tokens": [...]} per line',
                                                      dir_okay=False),
              help='JSONL, one {"text": ...} or {"tokens": [...]} per line (other fields are copied to the output).')
@click.option("--out", "out_file", default=None, type=InputPath("name a file to write, not a folder", exists=False, dir_okay=False),
              help="Write the predictions (JSONL) to this file instead of stdout.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@click.option("--checkpoint", default=_defaults.checkpoint, show_default=True, help="For a run folder: latest, best or a path.")
@click.option("--batch-size", type=click.IntRange(min=1), default=_defaults.batch_size, show_default=True, help="Lines per batch.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Cut longer texts to this many tokens (default: the model's maximum).")
@provider_option(_defaults.provider)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Compute threads (default: physical cores).")
@click.option("--verbose", is_flag=True, help="Show ONNX Runtime's logs.")
def command(model_dir, data, out_file, force, checkpoint, batch_size, seq_len, provider, threads, verbose) -> None:
    """Predict with RUN_OR_EXPORT (a seq-cls or token-cls run folder, or its merged-onnx export).

    \b
    seq-cls:   {"text": ...}  ->  {"text": ..., "label": "positive", "score": 0.97}
    token-cls: {"text": ...}  ->  {"text": ..., "entities": [{"start", "end", "label", "text", "score"}]}
               {"tokens": [...]} -> also "tags" (IOB2, one per token) and "text" (the tokens joined by spaces)
    """
    from ..errors import OutputExistsError
    from ..fsutil import write_text_atomic
    from ..predict import PredictionStats, format_line, open_classifier, predict_records

    if out_file and Path(out_file).exists() and not force:
        raise OutputExistsError(f"{out_file} exists", hint="pass --force to replace it, or choose another --out")
    classifier = open_classifier(model_dir, checkpoint=checkpoint, provider=provider, threads=threads, verbose=verbose)
    stats = PredictionStats()
    lines = []
    for result in predict_records(classifier, data, batch_size=batch_size, seq_len=seq_len, stats=stats):
        if out_file:
            lines.append(format_line(result) + "\n")
        else:
            click.echo(format_line(result))
    if out_file:
        write_text_atomic(out_file, "".join(lines))
    what = "labels" if classifier.task == "seq-cls" else "entities"
    counts = ", ".join(f"{name} {count}" for name, count in sorted(stats.counts.items())) or "none"
    click.echo(f"{stats.lines} lines ({classifier.task}); {what}: {counts}" + (f"; {stats.truncated} cut at --seq-len" if stats.truncated else "")
               + (f"; wrote {out_file}" if out_file else ""), err=True)
