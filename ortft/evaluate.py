"""Evaluation with the eval graph: `evaluate` (the loop training and `ortft eval` share) and `evaluate_path`.

Loss and perplexity (or accuracy; for token-cls also entity precision, recall and F1) of a session's
current adapter, and of a bundle or a run's checkpoint on JSONL data.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import run as runs
from .config import DEFAULT_SEQ_LEN, EvalConfig, default_of
from .data import DataConfig, iter_eval_batches, load_dataset
from .errors import RunError
from .threads import default_threads
from .validate import require_valid

log = logging.getLogger(__name__)


def scalar(outputs) -> float:
    """The first output of a session run (the loss), as a float."""
    first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    return float(np.asarray(first))


@dataclass
class EvalResult:
    """Loss and scores of one evaluation; `as_record` is its metrics.jsonl form."""

    loss: float
    tokens: int
    examples: int
    accuracy: float | None = None
    precision: float | None = None  # token-cls: strict IOB2 entity scores (ortft/metrics.py)
    recall: float | None = None
    f1: float | None = None

    @property
    def perplexity(self) -> float:
        return float(math.exp(min(self.loss, 700.0)))

    def as_record(self, prefix: str = "eval_") -> dict:
        record = {f"{prefix}loss": self.loss, f"{prefix}tokens": self.tokens}
        if self.accuracy is None:
            record[f"{prefix}perplexity"] = self.perplexity
        else:
            record[f"{prefix}accuracy"] = self.accuracy
        for name in ("precision", "recall", "f1"):
            if getattr(self, name) is not None:
                record[f"{prefix}{name}"] = getattr(self, name)
        return record


def evaluate(session, dataset, data_config: DataConfig, task: str, max_batches: int | None = None) -> EvalResult:
    """Token-weighted mean loss over a dataset (and accuracy for seq-cls; token accuracy and entity
    precision, recall and F1 for token-cls), with the eval graph."""
    from .metrics import TokenClassificationScores

    token_scores = TokenClassificationScores(data_config.label_names or []) if task == "token-cls" else None
    total_loss = 0.0
    total_tokens = 0
    examples = 0
    correct = 0
    session.release_idle_memory()  # the training step's freed heap and mapped weights go first (peak RSS)
    try:
        for batch in iter_eval_batches(dataset, data_config, max_batches):
            if batch.num_label_tokens == 0:
                continue
            outputs = session.evaluate(batch.inputs)
            loss = scalar(outputs)
            total_loss += loss * batch.num_label_tokens
            total_tokens += batch.num_label_tokens
            examples += batch.num_examples
            if task == "seq-cls":
                logits = np.asarray(outputs[1])
                correct += int((logits.argmax(axis=-1) == batch.inputs["labels"]).sum())
            elif token_scores is not None:
                token_scores.add(np.asarray(outputs[1]), batch.inputs["labels"])
    finally:
        session.release_idle_memory()
    if total_tokens == 0:
        raise RunError("the validation data holds no position to evaluate", hint="check the validation file")
    if token_scores is not None:
        return EvalResult(total_loss / total_tokens, total_tokens, examples, **token_scores.result())
    return EvalResult(total_loss / total_tokens, total_tokens, examples, correct / examples if task == "seq-cls" else None)


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
        if not runs.trained_on(run_info, bundle):
            raise RunError(f"the bundle {bundle} changed since run {target} was trained", hint="evaluate with the run's own bundle")
    task = manifest.task
    if seq_len is None:
        seq_len = _run_seq_len(target) if runs.is_run_dir(target) else DEFAULT_SEQ_LEN
    seq_len = min(seq_len, manifest.max_seq_len)
    tokenizer = load_tokenizer(manifest.tokenizer_path(bundle))
    config = DataConfig(seq_len=seq_len, batch_size=batch_size, seed=0, task=task, mask_prompt=mask_prompt,
                        label_names=manifest.labels, shuffle=False, max_example_chars=max_example_chars)
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
    try:
        return int(runs.read_config(run_dir)["seq_len"])
    except (RunError, OSError, ValueError, KeyError, TypeError):
        return DEFAULT_SEQ_LEN
