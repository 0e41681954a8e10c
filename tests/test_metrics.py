"""Entity-level precision, recall and F1 (ortft/metrics.py, ortft/iob2.py) against seqeval's strict IOB2 mode."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from seqeval import metrics as seqeval_metrics  # the reference, in the [dev] extra
from seqeval.scheme import IOB2, Tokens

from ortft.iob2 import Entity, is_iob2_label_set, strict_entities, tags_of_entities
from ortft.metrics import TokenClassificationScores, entity_scores

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


def seqeval_scores(true, predicted) -> tuple[float, float, float]:
    kwargs = {"mode": "strict", "scheme": IOB2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "precision is ill-defined": seqeval then reports 0, as ortft does
        return (seqeval_metrics.precision_score(true, predicted, **kwargs), seqeval_metrics.recall_score(true, predicted, **kwargs),
                seqeval_metrics.f1_score(true, predicted, **kwargs))


def random_sequences(rng, count: int, tags=TAGS) -> list[list[str]]:
    return [[tags[i] for i in rng.integers(0, len(tags), size=int(rng.integers(0, 12)))] for _ in range(count)]


EDGE_CASES = [
    ["I-PER", "I-PER", "O"],  # I without B: no entity in strict mode
    ["B-PER", "I-LOC", "I-LOC"],  # an I of another type ends the entity and starts nothing
    ["B-PER", "B-PER", "I-PER"],
    ["O", "B-LOC", "I-LOC", "I-LOC"],
    ["B-ORG"],
    [],
]


@pytest.mark.parametrize("tags", EDGE_CASES)
def test_strict_entities_are_seqevals(tags):
    expected = [(e.tag, e.start, e.end) for e in Tokens(tags, IOB2).entities] if tags else []
    assert [tuple(entity) for entity in strict_entities(tags)] == expected


def test_scores_equal_seqeval_on_random_predictions():
    rng = np.random.default_rng(0)
    for round_ in range(200):
        true = random_sequences(rng, int(rng.integers(1, 6)))
        # predictions: mostly the truth with some tags changed, so matches, misses and extras all occur
        predicted = [[tag if rng.random() < 0.7 else TAGS[rng.integers(0, len(TAGS))] for tag in row] for row in true]
        ours = entity_scores(true, predicted)
        assert (ours.precision, ours.recall, ours.f1) == pytest.approx(seqeval_scores(true, predicted), abs=1e-12), (round_, true, predicted)


@pytest.mark.parametrize("true,predicted", [
    ([["O", "O"]], [["O", "O"]]),  # no entity anywhere: seqeval reports 0
    ([["B-PER"]], [["O"]]),  # nothing predicted
    ([["O"]], [["B-PER"]]),  # nothing true
    ([["B-PER", "I-PER"]], [["B-PER", "O"]]),  # a partial match is no match
    ([["B-PER", "I-PER"]], [["B-PER", "I-PER"]]),
])
def test_scores_equal_seqeval_on_edge_cases(true, predicted):
    ours = entity_scores(true, predicted)
    assert (ours.precision, ours.recall, ours.f1) == pytest.approx(seqeval_scores(true, predicted), abs=1e-12)


def test_token_scores_from_logits_skip_ignored_positions():
    labels = np.array([[-100, 1, 2, -100, 0, 3], [-100, 3, 4, 0, -100, -100]])
    predicted_ids = np.array([[0, 1, 2, 4, 0, 0], [0, 3, 4, 3, 4, 4]])
    logits = np.eye(len(TAGS[:5]), dtype=np.float32)[predicted_ids]  # one-hot: argmax is predicted_ids
    scores = TokenClassificationScores(TAGS[:5])
    scores.add(logits[:1], labels[:1])
    scores.add(logits[1:], labels[1:])
    result = scores.result()
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "I-LOC", "B-LOC"]]
    assert result["accuracy"] == pytest.approx(5 / 7)
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx(seqeval_scores(true, predicted))


def test_labels_without_entity_types_give_accuracy_only():
    scores = TokenClassificationScores(["LABEL_0", "LABEL_1"])
    scores.add(np.array([[[1.0, 0.0], [0.0, 1.0]]]), np.array([[0, 0]]))
    assert scores.result() == {"accuracy": 0.5, "precision": None, "recall": None, "f1": None}
    assert not is_iob2_label_set(["LABEL_0", "LABEL_1"]) and is_iob2_label_set(["O", "B-X"]) and not is_iob2_label_set(["O"])


def test_tags_of_entities_round_trip():
    tags = tags_of_entities(6, [Entity("PER", 0, 2), Entity("LOC", 3, 4), Entity("LOC", 4, 6)])
    assert tags == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]
    assert strict_entities(tags) == [Entity("PER", 0, 2), Entity("LOC", 3, 4), Entity("LOC", 4, 6)]
