"""Token classification metrics: token accuracy and entity-level precision, recall and F1.

Entities are compared strictly (ortft/iob2.py): a predicted entity counts only when a true entity has
the same type, start and end in the same sequence; precision, recall and F1 are micro-averaged over all
entities, and 0 where undefined (no predicted or no true entity), as `seqeval` reports them
(`mode="strict", scheme=IOB2`). Words are the positions whose label is not -100 (the first sub-token
of each word). Device side: numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .iob2 import is_iob2_label_set, strict_entities

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EntityScores:
    precision: float
    recall: float
    f1: float
    true_entities: int
    predicted_entities: int
    correct_entities: int


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def entity_scores(true_sequences: Sequence[Sequence[str]], predicted_sequences: Sequence[Sequence[str]]) -> EntityScores:
    """Micro-averaged strict entity precision, recall and F1 of tag sequences of equal lengths."""
    if len(true_sequences) != len(predicted_sequences):
        raise ValueError(f"{len(true_sequences)} true sequences but {len(predicted_sequences)} predicted ones")
    true_count = predicted_count = correct = 0
    for index, (true_tags, predicted_tags) in enumerate(zip(true_sequences, predicted_sequences)):
        if len(true_tags) != len(predicted_tags):
            raise ValueError(f"sequence {index}: {len(true_tags)} true tags but {len(predicted_tags)} predicted ones")
        true_set = set(strict_entities(true_tags))
        predicted_set = set(strict_entities(predicted_tags))
        true_count += len(true_set)
        predicted_count += len(predicted_set)
        correct += len(true_set & predicted_set)
    precision, recall = _ratio(correct, predicted_count), _ratio(correct, true_count)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return EntityScores(precision, recall, f1, true_count, predicted_count, correct)


class TokenClassificationScores:
    """Collects the predictions of evaluation batches; `result()` gives accuracy, precision, recall, f1.

    precision, recall and f1 are None when the label names are not IOB2 tags (a bundle prepared with
    --num-labels): there is no entity to compare then, only tokens.
    """

    def __init__(self, label_names: Sequence[str]):
        self.label_names = list(label_names)
        self.has_entities = is_iob2_label_set(self.label_names)
        self.correct_tokens = 0
        self.tokens = 0
        self.true_sequences: list[list[str]] = []
        self.predicted_sequences: list[list[str]] = []

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        """One batch: logits [batch, sequence, labels] and labels [batch, sequence] (-100: not a word start)."""
        predictions = np.asarray(logits).argmax(axis=-1)
        labels = np.asarray(labels)
        for row_predictions, row_labels in zip(predictions, labels):
            counted = row_labels != IGNORE_INDEX
            true_ids, predicted_ids = row_labels[counted], row_predictions[counted]
            self.correct_tokens += int((true_ids == predicted_ids).sum())
            self.tokens += int(counted.sum())
            if self.has_entities:
                self.true_sequences.append([self.label_names[i] for i in true_ids.tolist()])
                self.predicted_sequences.append([self.label_names[i] for i in predicted_ids.tolist()])

    def result(self) -> dict:
        record = {"accuracy": _ratio(self.correct_tokens, self.tokens), "precision": None, "recall": None, "f1": None}
        if self.has_entities:
            scores = entity_scores(self.true_sequences, self.predicted_sequences)
            record.update(precision=scores.precision, recall=scores.recall, f1=scores.f1)
        return record
