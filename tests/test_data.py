"""Tests of ortft.data: formats, masking, padding, truncation, packing, shuffling, resume and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ortft.data import (
    IGNORE_INDEX,
    BatchIterator,
    DataConfig,
    LoaderPosition,
    iter_eval_batches,
    load_dataset,
    load_train_and_valid,
    split_validation,
)
from ortft.errors import ConfigError, DataError, RunError, TemplateError
from ortft.tokenizer import load_tokenizer
from helpers.data import write_jsonl
from helpers.tokenizers import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok"))


def config(**overrides) -> DataConfig:
    settings_ = {"seq_len": 128, "batch_size": 2, "seed": 0}
    settings_.update(overrides)
    return DataConfig(**settings_)


def learned_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX], skip_special_tokens=False)


# ---- formats and masking ------------------------------------------------------------------------


def test_text_format_learns_every_token_but_the_first(tmp_path, tokenizer) -> None:
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]), tokenizer, config())
    example = data.examples[0]
    expected = tokenizer.encode("hello world") + [tokenizer.eos_token_id]
    assert example.input_ids == expected
    assert example.labels == [IGNORE_INDEX] + expected[1:]
    assert data.format == "text" and len(data.sha256) == 64


def test_prompt_completion_masks_exact_prompt_positions(tmp_path, tokenizer) -> None:
    record = {"prompt": "What is the capital of Italy?", "completion": " Rome is the capital."}
    data = load_dataset(write_jsonl(tmp_path / "pc.jsonl", [record]), tokenizer, config())
    example = data.examples[0]
    full = record["prompt"] + record["completion"]
    encoded = tokenizer.encode_with_offsets(full)
    num_prompt_tokens = sum(1 for start, _ in encoded.offsets[1:] if start < len(record["prompt"])) + 1  # + BOS
    assert example.input_ids == encoded.ids + [tokenizer.eos_token_id]
    assert example.labels[:num_prompt_tokens] == [IGNORE_INDEX] * num_prompt_tokens
    assert example.labels[num_prompt_tokens:] == example.input_ids[num_prompt_tokens:]
    assert learned_text(tokenizer, example) == " Rome is the capital.<|im_end|>"

    unmasked = load_dataset(tmp_path / "pc.jsonl", tokenizer, config(mask_prompt=False)).examples[0]
    assert unmasked.labels == [IGNORE_INDEX] + unmasked.input_ids[1:]


def test_chat_masks_everything_but_assistant_replies(tmp_path, tokenizer) -> None:
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Answer: 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Answer: 6."},
    ]
    data = load_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tokenizer, config())
    example = data.examples[0]
    assert example.input_ids == tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert learned_text(tokenizer, example) == "Answer: 4.<|im_end|>Answer: 6.<|im_end|>"
    # Exact positions: each learned run starts right after "<|im_start|>assistant\n" and ends at <|im_end|>.
    end_id = tokenizer.token_to_id("<|im_end|>")
    learned = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    runs = np.split(learned, np.where(np.diff(learned) != 1)[0] + 1)
    assert len(runs) == 2
    for run in runs:
        assert example.input_ids[run[-1]] == end_id
        assert tokenizer.decode(example.input_ids[: run[0]], skip_special_tokens=False).endswith("<|im_start|>assistant\n")

    unmasked = load_dataset(tmp_path / "chat.jsonl", tokenizer, config(mask_prompt=False)).examples[0]
    assert unmasked.labels[1:] == unmasked.input_ids[1:]


def test_seq_cls_labels_by_name_and_index(tmp_path, tokenizer) -> None:
    records = [{"text": "good film", "label": "positive"}, {"text": "bad film", "label": 0}]
    cfg = config(task="seq-cls", label_names=["negative", "positive"])
    data = load_dataset(write_jsonl(tmp_path / "cls.jsonl", records), tokenizer, cfg)
    assert [ex.labels for ex in data.examples] == [1, 0]
    batch = next(iter_eval_batches(data, cfg))
    assert set(batch.inputs) == {"input_ids", "attention_mask", "labels"}
    assert batch.inputs["labels"].tolist() == [1, 0] and batch.inputs["labels"].dtype == np.int64
    assert batch.num_label_tokens == 2


# ---- padding, truncation, packing ---------------------------------------------------------------


def test_padding_right_with_masks_and_positions(tmp_path, tokenizer) -> None:
    records = [{"text": "hello"}, {"text": "hello world, the answer is 42."}]
    cfg = config(batch_size=2)
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", records), tokenizer, cfg)
    batch = next(iter_eval_batches(data, cfg))
    short, long = (len(ex.input_ids) for ex in data.examples)
    inputs = batch.inputs
    assert inputs["input_ids"].shape == (2, long)
    assert all(array.dtype == np.int64 for array in inputs.values())
    assert inputs["attention_mask"][0].tolist() == [1] * short + [0] * (long - short)
    assert (inputs["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert (inputs["labels"][0, short:] == IGNORE_INDEX).all()
    assert inputs["position_ids"].tolist() == [list(range(long))] * 2
    assert batch.num_tokens == short + long
    assert batch.num_label_tokens == int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()) == short - 1 + long - 1


def test_truncation_is_counted_and_fully_truncated_completions_are_dropped(tmp_path, tokenizer) -> None:
    records = [
        {"prompt": "hello world, the answer is", "completion": " 42."},  # prompt alone fills seq_len
        {"prompt": "Q", "completion": " hello world, the answer is 42."},  # completion cut short
        {"prompt": "Q", "completion": " hi"},
    ]
    data = load_dataset(write_jsonl(tmp_path / "pc.jsonl", records), tokenizer, config(seq_len=6))
    assert data.stats.num_without_labels == 1
    assert data.stats.num_examples == 2
    assert data.stats.num_truncated == 1  # the dropped one is counted in num_without_labels
    assert all(len(ex.input_ids) <= 6 for ex in data.examples)
    assert [ex.line for ex in data.examples] == [2, 3]


def test_packing_restarts_positions_per_example(tmp_path, tokenizer) -> None:
    records = [{"text": "hello"}, {"text": "world"}, {"text": "the answer is 42."}, {"text": "Rome"}]
    cfg = config(seq_len=64, batch_size=1, pack=True)
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", records), tokenizer, cfg)
    iterator = BatchIterator(data, cfg)
    assert len(iterator.rows) == 1 and iterator.batches_per_epoch == 1
    batch = next(iterator.epoch_batches(0))
    row = iterator.rows[0]
    expected_positions = sum((list(range(len(ex.input_ids))) for ex in row), [])
    assert batch.inputs["position_ids"][0].tolist() == expected_positions
    assert batch.inputs["input_ids"][0].tolist() == sum((ex.input_ids for ex in row), [])
    starts = np.cumsum([0] + [len(ex.input_ids) for ex in row[:-1]])
    assert (batch.inputs["labels"][0, starts] == IGNORE_INDEX).all()  # no label crosses examples
    assert batch.num_examples == 4
    assert batch.num_label_tokens == sum(ex.num_label_tokens for ex in row)


def test_packing_respects_seq_len(tmp_path, tokenizer) -> None:
    records = [{"text": "hello world, the answer is 42."}] * 10
    cfg = config(seq_len=20, batch_size=3, pack=True)
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", records), tokenizer, cfg)
    iterator = BatchIterator(data, cfg)
    assert all(sum(len(ex.input_ids) for ex in row) <= 20 for row in iterator.rows)
    assert sum(len(row) for row in iterator.rows) == 10
    for batch in iterator.epoch_batches(0):
        assert batch.inputs["input_ids"].shape[1] <= 20


def test_pack_with_seq_cls_is_refused() -> None:
    with pytest.raises(ConfigError, match="packing"):
        config(task="seq-cls", pack=True)


def _varied(tmp_path, n=40) -> Path:
    rng = np.random.default_rng(7)
    return write_jsonl(tmp_path / "varied.jsonl",
                       [{"prompt": f"Q{i}:", "completion": " answer" * int(rng.integers(1, 12))} for i in range(n)])


def test_batch_tokens_groups_similar_lengths_within_the_budget(tmp_path, tokenizer) -> None:
    cfg = config(seq_len=32, batch_tokens=64)
    data = load_dataset(_varied(tmp_path), tokenizer, cfg)
    iterator = BatchIterator(data, cfg)
    epoch = list(iterator.epoch_batches(0))
    assert len(epoch) == iterator.batches_per_epoch == len(iterator.groups) > 1
    seen = []
    for batch in epoch:
        rows, width = batch.inputs["input_ids"].shape
        assert rows * width <= 64
        assert rows == batch.num_examples  # one example per row: nothing attends across examples
        lengths = batch.inputs["attention_mask"].sum(axis=1)
        assert (batch.inputs["position_ids"][0, : lengths[0]] == np.arange(lengths[0])).all()
        seen += [tuple(row[: int(length)]) for row, length in zip(batch.inputs["input_ids"].tolist(), lengths)]
    assert sorted(seen) == sorted(tuple(example.input_ids) for example in data.examples)  # each example once
    padding = sum(b.inputs["attention_mask"].size - b.num_tokens for b in epoch) / sum(b.num_tokens for b in epoch)
    plain = list(BatchIterator(data, config(seq_len=32, batch_size=4)).epoch_batches(0))
    plain_padding = sum(b.inputs["attention_mask"].size - b.num_tokens for b in plain) / sum(b.num_tokens for b in plain)
    assert padding < plain_padding / 2  # grouped by length: far less padding than random batches of 4


def test_batch_tokens_order_is_per_seed_and_epoch_and_resumes(tmp_path, tokenizer) -> None:
    cfg = config(seq_len=32, batch_tokens=64)
    data = load_dataset(_varied(tmp_path), tokenizer, cfg)
    first, again = BatchIterator(data, cfg), BatchIterator(data, cfg)
    assert first.row_order(0).tolist() == again.row_order(0).tolist() != first.row_order(1).tolist()
    assert [_ids(b) for b in first.epoch_batches(1)] == [_ids(b) for b in again.epoch_batches(1)]
    uninterrupted = [_ids(batch) for (batch, _), _ in zip(BatchIterator(data, cfg).batches(), range(first.batches_per_epoch + 3))]
    stream = BatchIterator(data, cfg).batches()
    for _ in range(first.batches_per_epoch + 1):
        _, position = next(stream)
    resumed = BatchIterator(data, cfg).batches(LoaderPosition.from_dict(position.to_dict()))
    assert [_ids(batch) for (batch, _), _ in zip(resumed, range(2))] == uninterrupted[-2:]
    with pytest.raises(RunError, match="other data"):
        next(BatchIterator(data, config(seq_len=32, batch_tokens=96)).batches(position))


def test_batch_tokens_evaluation_order_follows_the_file_not_the_lengths(tmp_path, tokenizer) -> None:
    cfg = config(seq_len=32, batch_tokens=64)
    data = load_dataset(_varied(tmp_path), tokenizer, cfg)
    batches = list(iter_eval_batches(data, cfg))
    assert sum(b.num_examples for b in batches) == len(data.examples)
    first_lines = []
    for batch in batches:
        rows = {tuple(row[: int(n)]) for row, n in zip(batch.inputs["input_ids"].tolist(), batch.inputs["attention_mask"].sum(axis=1))}
        first_lines.append(min(i for i, example in enumerate(data.examples) if tuple(example.input_ids) in rows))
    assert first_lines == sorted(first_lines)  # by each group's first example in the file
    widths = [b.inputs["input_ids"].shape[1] for b in batches]
    assert widths != sorted(widths)  # not shortest first: a --max-eval-batches subset sees all lengths


def test_batch_tokens_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="at least --seq-len"):
        config(seq_len=128, batch_tokens=64)
    with pytest.raises(ConfigError, match="not both"):
        config(seq_len=32, batch_tokens=64, pack=True)


# ---- shuffling, resume, split -------------------------------------------------------------------


def _many(tmp_path, n=23) -> Path:
    return write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(n)])


def _ids(batch):
    return batch.inputs["input_ids"].tolist()


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path, tokenizer) -> None:
    path = _many(tmp_path)
    first = BatchIterator(load_dataset(path, tokenizer, config(batch_size=4)), config(batch_size=4))
    again = BatchIterator(load_dataset(path, tokenizer, config(batch_size=4)), config(batch_size=4))
    other_seed = BatchIterator(load_dataset(path, tokenizer, config(batch_size=4)), config(batch_size=4, seed=1))
    assert first.row_order(0).tolist() == again.row_order(0).tolist()
    assert first.row_order(0).tolist() != first.row_order(1).tolist()
    assert first.row_order(0).tolist() != other_seed.row_order(0).tolist()
    assert first.batches_per_epoch == 6  # 23 examples, the last batch holds 3
    epoch = list(first.epoch_batches(0))
    assert [_ids(b) for b in epoch] == [_ids(b) for b in again.epoch_batches(0)]
    assert sum(b.num_examples for b in epoch) == 23


def test_resume_yields_the_same_batches_as_an_uninterrupted_run(tmp_path, tokenizer) -> None:
    cfg = config(batch_size=4)
    data = load_dataset(_many(tmp_path), tokenizer, cfg)
    uninterrupted = [_ids(batch) for (batch, _), _ in zip(BatchIterator(data, cfg).batches(), range(17))]

    stream = BatchIterator(data, cfg).batches()
    before = []
    for _ in range(8):  # crosses the epoch boundary at 6
        batch, position = next(stream)
        before.append(_ids(batch))
    saved = json.loads(json.dumps(position.to_dict()))
    assert saved["epoch"] == 1 and saved["batch_index"] == 2

    reloaded = load_dataset(tmp_path / "many.jsonl", tokenizer, cfg)
    resumed = BatchIterator(reloaded, cfg).batches(LoaderPosition.from_dict(saved))
    after = [_ids(batch) for (batch, _), _ in zip(resumed, range(9))]
    assert before + after == uninterrupted


def test_resume_with_other_settings_is_refused(tmp_path, tokenizer) -> None:
    data = load_dataset(_many(tmp_path), tokenizer, config(batch_size=4))
    _, position = next(BatchIterator(data, config(batch_size=4)).batches())
    with pytest.raises(RunError, match="other data"):
        next(BatchIterator(data, config(batch_size=3)).batches(position))
    with pytest.raises(RunError, match="batch_index"):
        LoaderPosition.from_dict({"epoch": 0, "batch_index": -1})


def test_validation_split_is_deterministic_and_disjoint(tmp_path, tokenizer) -> None:
    cfg = config()
    train, valid = load_train_and_valid(_many(tmp_path, 40), tokenizer, cfg, valid_fraction=0.1)
    again_train, again_valid = load_train_and_valid(tmp_path / "many.jsonl", tokenizer, cfg, valid_fraction=0.1)
    lines = lambda d: [ex.line for ex in d.examples]  # noqa: E731
    assert len(valid.examples) == 4 and len(train.examples) == 36
    assert lines(valid) == lines(again_valid) and lines(train) == lines(again_train)
    assert not set(lines(valid)) & set(lines(train))
    _, other_valid = split_validation(load_dataset(tmp_path / "many.jsonl", tokenizer, cfg), 0.1, seed=5)
    assert lines(other_valid) != lines(valid)
    with pytest.raises(ConfigError):
        split_validation(train, 1.5, seed=0)


def test_fewer_examples_than_batch_size_is_reported(tmp_path, tokenizer) -> None:
    cfg = config(batch_size=8)
    data = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": "world"}]), tokenizer, cfg)
    assert data.stats.fewer_examples_than_batch_size
    batches = list(BatchIterator(data, cfg).epoch_batches(0))
    assert len(batches) == 1 and batches[0].inputs["input_ids"].shape[0] == 2


# ---- accepted oddities and errors ---------------------------------------------------------------


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path, tokenizer) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\r\n\r\n   \n{"text": "world"}')  # no final newline
    data = load_dataset(path, tokenizer, config())
    assert [ex.line for ex in data.examples] == [1, 4]


def _error_for(tmp_path, tokenizer, content: bytes, **overrides) -> DataError:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_dataset(path, tokenizer, config(**overrides))
    assert str(path) in str(caught.value)
    assert caught.value.hint
    return caught.value


GOOD = b'{"text": "hello"}\n'


@pytest.mark.parametrize(
    ("content", "overrides", "expected"),
    [
        (b"", {}, "empty"),
        (b"\n\n  \n", {}, "empty"),
        (GOOD + b'{"text": "h\xff"}\n', {}, r"line 2: not valid UTF-8"),
        (GOOD + b'{"text": "hel', {}, r"line 2: the last line is incomplete"),
        (GOOD + b'{"text": "hel\n' + GOOD, {}, r"line 2: not valid JSON"),
        (GOOD + b"[1, 2]\n", {}, r"line 2: expected a JSON object, found an array"),
        (GOOD + b'"text"\n', {}, r"line 2: expected a JSON object, found a string"),
        (GOOD + b'{"text": 5}\n', {}, r"line 2: field 'text' must be a string, found a number"),
        (GOOD + b'{"txt": "a"}\n', {}, r"line 2: no known field \(found: txt\)"),
        (b'{"prompt": "a"}\n', {}, r"line 1: missing field 'completion'"),
        (b'{"messages": []}\n', {}, r"line 1: 'messages' must be a non-empty array"),
        (b'{"messages": [{"role": "user"}]}\n', {}, r"line 1, message 0: missing field 'content'"),
        (b'{"messages": [{"role": "user", "content": null}]}\n', {}, r"line 1, message 0: field 'content' must be a string, found null"),
        (b'{"text": "a", "score": NaN}\n', {}, r"line 1: not valid JSON \(NaN"),
        (b'{"text": "a", "score": -Infinity}\n', {}, r"line 1: not valid JSON \(-Infinity"),
        (b'{"text": "a", "score": 1e999}\n', {}, r"line 1: not valid JSON .*finite"),
        (b'{"text": "\\ud800"}\n', {}, r"line 1: field 'text' holds an unpaired UTF-16 surrogate"),
        (GOOD + b'{"prompt": "a", "completion": "b"}\n', {}, r"line 2: this line is in prompt-completion format, but line 1 is in text"),
        (b'{"text": "a", "label": "meh"}\n', {"task": "seq-cls", "label_names": ["negative", "positive"]}, r"line 1: unknown label 'meh'"),
        (b'{"text": "a", "label": 2}\n', {"task": "seq-cls", "label_names": ["negative", "positive"]}, r"line 1: label index 2 is out of range"),
        (b'{"text": "a", "label": true}\n', {"task": "seq-cls", "label_names": ["negative", "positive"]}, r"line 1: 'label' must be"),
        (b'{"text": "a"}\n', {"task": "seq-cls"}, r"line 1: missing field 'label'"),
        (b'{"prompt": "hello world", "completion": ""}\n', {}, None),  # eos is still learned: fine
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', {}, r"no token left to learn from: all 1 examples"),
        (b'{"prompt": "hello world, the answer is", "completion": " 42"}\n', {"seq_len": 4}, "no token left to learn from"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, tokenizer, content, overrides, expected) -> None:
    if expected is None:
        path = tmp_path / "ok.jsonl"
        path.write_bytes(content)
        assert load_dataset(path, tokenizer, config(**overrides)).stats.num_label_tokens == 1
        return
    error = _error_for(tmp_path, tokenizer, content, **overrides)
    import re

    assert re.search(expected, error.message), error.message


def test_template_error_in_data_names_the_line(tmp_path) -> None:
    folder = write_tiny_tokenizer(
        tmp_path / "tok", chat_template="{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}x"
    )
    tok = load_tokenizer(folder)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(TemplateError, match=r"chat.jsonl, line 1: .*first message must be user"):
        load_dataset(path, tok, config())


def test_missing_file_is_a_data_error(tmp_path, tokenizer) -> None:
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(tmp_path / "nope.jsonl", tokenizer, config())


# ---- fuzzing: only DataError escapes ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["text", "prompt", "completion", "messages", "label", "role", "content", "x"])
records = st.dictionaries(field_names, json_values, max_size=4) | json_values
message_lists = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", 3]), "content": json_values}),
    max_size=4,
).map(lambda messages: {"messages": messages})


def _encode_line(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", errors="surrogatepass")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.one_of(records, message_lists).map(_encode_line) | st.binary(max_size=30), max_size=6),
    task=st.sampled_from(["causal-lm", "seq-cls"]),
    pack=st.booleans(),
)
def test_random_lines_raise_only_data_error(tmp_path, tokenizer, lines, task, pack) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    cfg = config(seq_len=16, task=task, pack=pack and task == "causal-lm", label_names=["negative", "positive"])
    try:
        data = load_dataset(path, tokenizer, cfg)
    except DataError as error:
        assert str(path) in error.message
        return
    for batch in BatchIterator(data, cfg).epoch_batches(0):
        assert batch.num_label_tokens >= 1
