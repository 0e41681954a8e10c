"""`ortft eval`: loss and perplexity (or accuracy) of a bundle or a trained run on JSONL data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..cli_paths import InputPath
from ..config import DEFAULT_SEQ_LEN, EvalConfig

_defaults = EvalConfig()


@click.command("eval")
@click.argument("bundle_or_run", type=click.Path())
@click.option("--data", required=True, type=InputPath("pass a JSONL file of examples (docs/data.md)", dir_okay=False),
              help="Evaluation data (JSONL).")
@click.option("--batch-size", type=int, default=_defaults.batch_size, show_default=True, help="Examples per batch.")
@click.option("--seq-len", type=int, default=_defaults.seq_len, help="Truncate examples to this many tokens (default: the run's setting; for a bundle "
                   f"{DEFAULT_SEQ_LEN}, or its max_seq_len if smaller).")
@click.option("--max-example-chars", type=click.IntRange(min=1), default=None,
              help="Characters of an example read before tokenizing (as in training).  [default: 64 x --seq-len]")
@click.option("--checkpoint", default=_defaults.checkpoint, show_default=True, help="For a run: latest, best, or a checkpoint folder.")
@click.option("--mask-prompt/--no-mask-prompt", default=None, help="As in training (default: on for prompt/chat data).")
@click.option("--threads", type=int, default=None, help="ORT intra-op threads (default: physical cores).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with loss, perplexity or accuracy (token-cls: also precision, recall, f1), tokens.")
def command(bundle_or_run, data, batch_size, seq_len, max_example_chars, checkpoint, mask_prompt, threads, as_json):
    """Evaluate BUNDLE_OR_RUN on --data: loss and perplexity (accuracy for seq-cls; token accuracy and
    strict IOB2 entity precision, recall and F1 for token-cls)."""
    from ..evaluate import evaluate_path

    refuse_export_folder(bundle_or_run, data)
    record = evaluate_path(bundle_or_run, data, batch_size=batch_size, seq_len=seq_len, checkpoint=checkpoint,
                           threads=threads, mask_prompt=mask_prompt, max_example_chars=max_example_chars)
    if as_json:
        click.echo(json.dumps(record))
        return
    click.echo(f"loss        {record['loss']:.4f}")
    if "perplexity" in record:
        click.echo(f"perplexity  {record['perplexity']:.3f}")
    else:
        click.echo(f"accuracy    {record['accuracy']:.4f}")
    if record.get("f1") is not None:
        click.echo(f"entities    precision {record['precision']:.4f}  recall {record['recall']:.4f}  f1 {record['f1']:.4f}")
    click.echo(f"tokens      {record['tokens']}  ({record['examples']} examples; {record['checkpoint']})")


def refuse_export_folder(path: str, data: str) -> None:
    """An export folder is neither a bundle nor a run: say so, and which run folder to evaluate instead."""
    from ..errors import BundleError, RunError
    from ..export import EXPORT_KINDS
    from ..export_manifest import read_export_manifest
    from ..manifest import MANIFEST_NAME
    from ..trust import member_path

    try:
        member_path(path, MANIFEST_NAME, what="folder")  # a regular file, no link on the way
        export = read_export_manifest(Path(path))
    except BundleError:  # no such file, or unreadable: the bundle and run checks say what is wrong
        return
    if export is None:
        return
    source = export.get("source") if isinstance(export.get("source"), dict) else {}
    run, checkpoint = _printable(source.get("run")), _printable(source.get("checkpoint"))
    kind = export.get("kind") if export.get("kind") in EXPORT_KINDS else "ortft export"
    origin = (f", exported from run folder '{run}'" + (f" at {checkpoint}" if checkpoint else "")) if run else ""
    command = f"ortft eval RUN_DIR --data {data}" + (f" --checkpoint {checkpoint}" if checkpoint else "")
    raise RunError(
        f"{path} is an export folder ({kind}{origin}), not a bundle or a run folder, which `ortft eval` scores",
        hint=f"evaluate the run folder it came from: {command}, where RUN_DIR is the `ortft train --out` folder"
             + (f" named '{run}'" if run else ""),
    )


def _printable(value: object) -> str | None:
    """A manifest's string, if it is short and prints as itself (no control characters); else None."""
    return value if isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable() else None
