"""`evaluate_path`: loss and perplexity (or accuracy; for token-cls also entity precision, recall and F1) of a
bundle or a run's checkpoint on JSONL data."""

from __future__ import annotations

import logging
from pathlib import Path

from . import run as runs
from .config import DEFAULT_SEQ_LEN, EvalConfig, default_of
from .data import DataConfig, load_dataset
from .threads import default_threads
from .train import evaluate
from .validate import require_valid

log = logging.getLogger(__name__)



def evaluate_path(target: Path | str, data: Path | str, batch_size: int = default_of(EvalConfig, "batch_size"), seq_len: int | None = None,
                  checkpoint: str = default_of(EvalConfig, "checkpoint"), threads: int | None = None, mask_prompt: bool | None = None,
                  max_batches: int | None = None, max_example_chars: int | None = None) -> dict:
    """Evaluate a bundle (its initial adapters) or a run (its `checkpoint`) on `data`.

    `seq_len` defaults to the run's own training setting (DEFAULT_SEQ_LEN for a bundle).
    """
    from .runtime import TrainingSession
    from .tokenizer import load_tokenizer

    target = Path(target)
    checkpoint_file = None
    if runs.is_run_dir(target):
        run_info = runs.read_run(target)
        bundle = runs.run_bundle_dir(target, run_info)
        folder = runs.resolve_checkpoint(target, checkpoint)
        checkpoint_file = folder / runs.ADAPTER_FILE
    else:
        bundle = target
    manifest = require_valid(bundle)
    if runs.is_run_dir(target):
        from .manifest import bundle_digests
        from .errors import RunError

        if run_info.get("bundle_manifest_sha256") not in bundle_digests(bundle):
            raise RunError(f"the bundle {bundle} changed since run {target} was trained", hint="evaluate with the run's own bundle")
    task = manifest["task"]
    if seq_len is None:
        seq_len = _run_seq_len(target) if runs.is_run_dir(target) else DEFAULT_SEQ_LEN
    seq_len = min(seq_len, int(manifest["model"]["max_seq_len"]))
    tokenizer = load_tokenizer(bundle / manifest["tokenizer"]["dir"])
    config = DataConfig(seq_len=seq_len, batch_size=batch_size, seed=0, task=task, mask_prompt=mask_prompt,
                        label_names=manifest.get("labels"), shuffle=False, max_example_chars=max_example_chars)
    dataset = load_dataset(data, tokenizer, config)
    for note in dataset.stats.notes("evaluation", seq_len, None):
        log.warning("%s: %s", data, note)
    session = TrainingSession(bundle, parameters=checkpoint_file, threads=threads or default_threads(), with_optimizer=False,
                              manifest=manifest)
    result = evaluate(session, dataset, config, task, max_batches)
    record = {"loss": result.loss, "tokens": result.tokens, "examples": result.examples,
              "checkpoint": str(checkpoint_file.parent) if checkpoint_file else "bundle"}
    if result.accuracy is None:
        record["perplexity"] = result.perplexity
    else:
        record["accuracy"] = result.accuracy
    if task == "token-cls":  # entity scores; null for a bundle whose labels are not IOB2 tags
        record.update(precision=result.precision, recall=result.recall, f1=result.f1)
    return record


def _run_seq_len(run_dir: Path) -> int:
    import json

    try:
        return int(json.loads((run_dir / runs.CONFIG_FILE).read_text(encoding="utf-8"))["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_SEQ_LEN
