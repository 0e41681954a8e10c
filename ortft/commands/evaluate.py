"""`ortft eval`: loss and perplexity (or accuracy) of a bundle or a trained run on JSONL data."""

from __future__ import annotations

import json

import click


@click.command("eval")
@click.argument("bundle_or_run", type=click.Path())
@click.option("--data", required=True, help="Evaluation data (JSONL).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--seq-len", type=int, default=None, help="Truncate examples to this many tokens (default: the run's setting, 512 for a bundle).")
@click.option("--max-example-chars", type=click.IntRange(min=1), default=None,
              help="Characters of an example read before tokenizing (as in training).  [default: 64 x --seq-len]")
@click.option("--checkpoint", default="latest", show_default=True, help="For a run: latest, best, or a checkpoint folder.")
@click.option("--mask-prompt/--no-mask-prompt", default=None, help="As in training (default: on for prompt/chat data).")
@click.option("--threads", type=int, default=None, help="ORT intra-op threads (default: physical cores).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with loss, perplexity or accuracy (token-cls: also precision, recall, f1), tokens.")
def command(bundle_or_run, data, batch_size, seq_len, max_example_chars, checkpoint, mask_prompt, threads, as_json):
    """Evaluate BUNDLE_OR_RUN on --data: loss and perplexity (accuracy for seq-cls; token accuracy and
    strict IOB2 entity precision, recall and F1 for token-cls)."""
    from ..evaluate import evaluate_path

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
