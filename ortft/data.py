"""Training data: JSONL -> tokens -> masked labels -> batches, with a resumable position.

Formats (one JSON object per line; see docs/data.md):
    {"text": ...}                                  causal-lm, every token is learned
    {"prompt": ..., "completion": ...}             causal-lm, prompt masked by default
    {"messages": [{"role": ..., "content": ...}]}  causal-lm, rendered with the chat template;
                                                   everything but assistant replies masked by default
    {"text": ..., "label": 0 | "name"}             seq-cls (label: class index or a name from the labels)
    {"tokens": [...], "tags": [...]}               token-cls, IOB2 tags per word (ortft/data_ner.py)
    {"text": ..., "entities": [{"start", "end", "label"}]}  token-cls, entities as character spans

Use from the training loop:
    config = DataConfig(seq_len=256, batch_size=4, seed=0)      # or DataConfig.from_train_config(cfg)
    train = load_dataset(path, tokenizer, config)               # raises DataError for bad data
    train, valid = split_validation(train, fraction=0.1, seed=0)
    batches = BatchIterator(train, config)
    for batch, position in batches.batches(start=LoaderPosition.from_dict(saved) if resuming else None):
        session.train_step(**batch.inputs)      # dict of int64 arrays named like the graph inputs
        save(position.to_dict())                # resuming from it yields exactly the following batches
    for batch in iter_eval_batches(valid, config): ...

Labels follow Hugging Face: unshifted (labels[b, t] == input_ids[b, t] where learned, -100 elsewhere);
the graph shifts them. The first token of every example is never a label (nothing predicts it),
so `labels[:, 1:] != -100` counts exactly the positions that carry loss. Padding is never a label.
Examples left with no label (e.g. the completion was truncated away) are dropped and counted; a file
with no label at all raises DataError.

Packing (`pack=True`, causal-lm only) concatenates several examples into one row of at most
`seq_len` tokens and restarts `position_ids` at 0 for each example. Be aware: the graph's attention
mask is the plain padding mask, so tokens of a packed example CAN attend to earlier examples in the
same row (no block-diagonal mask). Position ids restart, the first label of each example is masked,
but the contexts are not isolated. Use packing for throughput on short, independent examples; leave
it off when that cross-example attention matters.

Length-grouped batches (`batch_tokens=N`, either task) keep one example per row, isolated as without
packing, and put examples of similar length together: as many rows as fit in N tokens counting each
row at the batch's longest length. Short examples then make many-row batches with little padding and
no attention over other examples (attention cost grows with row length, packed rows are long).

Shuffling is deterministic for a seed: rows are permuted per epoch with numpy's Generator seeded by
(seed, epoch). A `LoaderPosition` {epoch, batch_index, fingerprint} is all the state a resume needs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from . import data_ner
from .config import InputLimits
from .data_limits import cut_messages, cut_prompt_completion, cut_text
from .errors import ConfigError, DataError, RunError, TemplateError
from .jsonl import UTF8_BOM, JsonlReader  # noqa: F401  (UTF8_BOM: part of the API)
from .jsonl import json_type as _json_type

if TYPE_CHECKING:  # imported for type names only; the loader takes any object with this interface
    from .tokenizer import TextTokenizer


IGNORE_INDEX = -100
TASK_CAUSAL_LM = "causal-lm"
TASK_SEQ_CLS = "seq-cls"
TASK_TOKEN_CLS = "token-cls"

FORMAT_TEXT = "text"
FORMAT_PROMPT_COMPLETION = "prompt-completion"
FORMAT_CHAT = "chat"
FORMAT_CLASSIFICATION = "text-label"


# Separate random streams (numpy SeedSequence entropy) so the split and the shuffles never correlate.
_SPLIT_STREAM = 0x5EED_5B17
_SHUFFLE_STREAM = 0x5EED_5F1E
_PACK_STREAM = 0x5EED_BAC4
_GROUP_STREAM = 0x5EED_6B0F


# ---- configuration and results ------------------------------------------------------------------


@dataclass
class DataConfig:
    """What the loader needs to know. Defaults of the shared options live in `ortft.config.TrainConfig`.

    mask_prompt: None = on for prompt/completion and chat data (text data has no prompt).
    label_names: seq-cls class names (index = class id); labels in the data may be names or ids.
    """

    seq_len: int
    batch_size: int
    seed: int
    task: str = TASK_CAUSAL_LM
    mask_prompt: bool | None = None
    pack: bool = False
    label_names: Sequence[str] | None = None
    shuffle: bool = True
    batch_tokens: int | None = None  # length-grouped batches of up to this many tokens (rows x longest row)
    max_example_chars: int | None = None  # characters an example keeps before tokenizing (None: InputLimits' default)

    def __post_init__(self) -> None:
        if self.task not in (TASK_CAUSAL_LM, TASK_SEQ_CLS, TASK_TOKEN_CLS):
            raise ConfigError(f"unknown task {self.task!r}", hint=f"use {TASK_CAUSAL_LM}, {TASK_SEQ_CLS} or {TASK_TOKEN_CLS}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"seq_len must be an integer of at least 2, got {self.seq_len!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.pack and self.task != TASK_CAUSAL_LM:
            raise ConfigError("packing is for causal-lm data only", hint=f"drop --pack for a {self.task} bundle")
        if self.batch_tokens is not None:
            if not isinstance(self.batch_tokens, int) or self.batch_tokens < self.seq_len:
                raise ConfigError(
                    f"--batch-tokens must be a whole number of at least --seq-len ({self.seq_len}), got {self.batch_tokens!r}",
                    hint="a batch must hold at least one example of the longest allowed length",
                )
            if self.pack:
                raise ConfigError("give either --pack or --batch-tokens, not both",
                                  hint="--batch-tokens groups whole examples by length; --pack concatenates them")
        if self.max_example_chars is not None and (not isinstance(self.max_example_chars, int) or self.max_example_chars < 1):
            raise ConfigError(f"--max-example-chars must be a whole number of at least 1, got {self.max_example_chars!r}")

    @property
    def example_chars(self) -> int:
        """Characters an example keeps before it is tokenized (--max-example-chars, or --seq-len x 64)."""
        return InputLimits().example_chars(self.seq_len, self.max_example_chars)

    @property
    def line_bytes(self) -> int:
        """The longest JSONL line read (6 bytes per kept character, for \\uXXXX escapes, plus 64 KiB)."""
        return InputLimits().line_bytes(self.example_chars)

    @property
    def max_turns(self) -> int:
        """Messages a chat example keeps: every message renders at least one token, so --seq-len of them."""
        return self.seq_len

    @classmethod
    def from_train_config(cls, train_config, task: str = TASK_CAUSAL_LM, label_names: Sequence[str] | None = None):
        """Build from `ortft.config.TrainConfig` (seq_len, batch_size, seed, mask_prompt, pack, batch_tokens)."""
        return cls(
            seq_len=train_config.seq_len,
            batch_size=train_config.batch_size,
            seed=train_config.seed,
            task=task,
            mask_prompt=train_config.mask_prompt,
            pack=train_config.pack,
            label_names=label_names,
            batch_tokens=train_config.batch_tokens,
            max_example_chars=getattr(train_config, "max_example_chars", None),
        )


@dataclass(slots=True)  # no __dict__: millions of small examples stay small
class Example:
    """One tokenized example. `labels` is a per-token list (causal-lm) or a class id (seq-cls)."""

    input_ids: list[int]
    labels: list[int] | int
    line: int
    truncated: bool = False

    @property
    def num_label_tokens(self) -> int:
        if isinstance(self.labels, int):
            return 1
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class DataStats:
    """What the loader saw. `num_lines` and `num_without_labels` describe the whole file, the rest
    describe the examples kept (after a validation split: the examples of that part)."""

    path: str
    format: str
    num_lines: int
    num_examples: int
    num_truncated: int
    num_without_labels: int
    num_tokens: int
    num_label_tokens: int
    longest_example_tokens: int
    fewer_examples_than_batch_size: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def notes(self, role: str, seq_len: int, batch_size: int | None) -> list[str]:
        """The facts about this data a user should hear, once (`role`: training, validation, evaluation;
        `batch_size` None: batches are not counted in examples, e.g. --batch-tokens)."""
        notes = []
        if self.fewer_examples_than_batch_size and batch_size:
            notes.append(f"only {self.num_examples} {role} examples, fewer than --batch-size {batch_size}: {role} on what there is")
        if self.num_truncated:
            notes.append(f"{self.num_truncated} {role} examples were longer than --seq-len {seq_len} and were truncated")
        if self.num_without_labels:
            notes.append(f"{self.num_without_labels} {role} examples had no token left to learn from and were dropped")
        return notes


@dataclass
class TokenizedDataset:
    """Examples of one JSONL file, ready for batching, plus the file's sha256 and the loader's stats."""

    path: Path
    sha256: str
    format: str
    task: str
    examples: list[Example]
    stats: DataStats
    pad_token_id: int


@dataclass
class Batch:
    """One batch: `inputs` are the graph inputs (int64 arrays) and the counts a trainer logs."""

    inputs: dict[str, np.ndarray]
    num_examples: int
    num_tokens: int  # non-padding tokens
    num_label_tokens: int  # positions that carry loss: labels[:, 1:] != -100 (seq-cls: batch size)


@dataclass
class LoaderPosition:
    """Where the batch stream stands: the next batch is batch `batch_index` of epoch `epoch`.

    `fingerprint` ties the position to the data and batching settings; restoring it against other
    data raises RunError instead of silently yielding different batches.
    """

    epoch: int = 0
    batch_index: int = 0
    fingerprint: str | None = None

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, state: Any) -> "LoaderPosition":
        if not isinstance(state, dict):
            raise RunError("the saved data position is not a JSON object", hint="the run state is damaged")
        epoch, batch_index = state.get("epoch"), state.get("batch_index")
        for name, value in (("epoch", epoch), ("batch_index", batch_index)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RunError(f"the saved data position has an invalid {name}: {value!r}", hint="the run state is damaged")
        fingerprint = state.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise RunError("the saved data position has an invalid fingerprint", hint="the run state is damaged")
        return cls(epoch=epoch, batch_index=batch_index, fingerprint=fingerprint)


# ---- reading JSONL ------------------------------------------------------------------------------


def read_jsonl(path: Path, max_line_bytes: int | None = None) -> tuple[str, list[tuple[int, dict]]]:
    """Read a whole JSONL file strictly (ortft/jsonl.py): (sha256 of the file, [(line number, object)]).

    For small files; `load_dataset` streams (one line in memory at a time). Accepts a UTF-8 BOM, CRLF line
    ends and blank lines; raises DataError naming file and line for anything else that is wrong.
    """
    reader = JsonlReader(path, max_line_bytes)
    records = list(reader)
    return reader.sha256, records


def _require_text(value: Any, field_name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field_name!r} must be a string, found {_json_type(value)}", hint="fix that line")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where}: field {field_name!r} holds an unpaired UTF-16 surrogate escape (such as \\ud800)",
            hint="remove or fix the escape; it is not a character",
        ) from exc
    return value


def _detect_format(record: dict, task: str, where: str) -> str:
    if task == TASK_SEQ_CLS:
        return FORMAT_CLASSIFICATION
    if task == TASK_TOKEN_CLS:
        return data_ner.detect_format(record, where)
    if "messages" in record:
        return FORMAT_CHAT
    if "prompt" in record or "completion" in record:
        return FORMAT_PROMPT_COMPLETION
    if "text" in record:
        return FORMAT_TEXT
    keys = ", ".join(sorted(record)) or "none"
    raise DataError(
        f"{where}: no known field (found: {keys})",
        hint='use {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}',
    )


def _require_field(record: dict, name: str, where: str, data_format: str) -> Any:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} ({data_format} format)", hint="add the field to that line")
    return record[name]


def _read_messages(record: dict, where: str) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty array, found {_json_type(messages)}", hint="fix that line")
    checked = []
    for index, message in enumerate(messages):
        at = f"{where}, message {index}"
        if not isinstance(message, dict):
            raise DataError(f"{at}: must be an object with 'role' and 'content', found {_json_type(message)}", hint="fix that line")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{at}: missing field {key!r}", hint="every message needs a role and a content")
        _require_text(message["role"], "role", at)
        _require_text(message["content"], "content", at)
        checked.append(message)
    return checked


def _read_class_label(value: Any, label_names: Sequence[str] | None, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: 'label' must be a class index or name, found {_json_type(value)}", hint="fix that line")
    if isinstance(value, str):
        _require_text(value, "label", where)
        if not label_names:
            raise DataError(
                f"{where}: label {value!r} is a name, but the bundle has no label names",
                hint="use class indices, or prepare the bundle with --labels",
            )
        if value not in label_names:
            raise DataError(
                f"{where}: unknown label {value!r}",
                hint=f"known labels: {', '.join(label_names)}",
            )
        return list(label_names).index(value)
    if value < 0 or (label_names and value >= len(label_names)):
        limit = f"0..{len(label_names) - 1}" if label_names else "0 or more"
        raise DataError(f"{where}: label index {value} is out of range (expected {limit})", hint="fix that line")
    return value


# ---- tokenizing and masking ---------------------------------------------------------------------


def _labels_for_spans(encoded, learn_spans: list[tuple[int, int]] | None) -> list[int]:
    """Per-token labels: a token is learned when its first character lies in a learn span.

    `learn_spans=None` learns every token. Tokens the post-processor added (no characters) are
    learned only when they follow a learned token (an eos appended after a learned completion).
    """
    labels: list[int] = []
    for token_id, (start, _end), added in zip(encoded.ids, encoded.offsets, encoded.added_by_post_processor):
        if added:
            learned = bool(labels) and labels[-1] != IGNORE_INDEX
        elif learn_spans is None:
            learned = True
        else:
            learned = any(span_start <= start < span_end for span_start, span_end in learn_spans)
        labels.append(token_id if learned else IGNORE_INDEX)
    return labels


def _append_eos(ids: list[int], labels: list[int], eos_id: int | None, learn: bool) -> None:
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
        labels.append(eos_id if learn else IGNORE_INDEX)


class _ExampleBuilder:
    """Turns validated records into `Example`s for one file and one config."""

    def __init__(self, tokenizer: "TextTokenizer", config: DataConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.chars = config.example_chars  # cut before tokenizing (ortft/data_limits.py)

    def mask_prompt_for(self, data_format: str) -> bool:
        if data_format == FORMAT_TEXT:
            return False
        return True if self.config.mask_prompt is None else bool(self.config.mask_prompt)

    def _encode(self, text: str, add_special_tokens: bool, where: str):
        try:
            return self.tokenizer.encode_with_offsets(text, add_special_tokens=add_special_tokens)
        except Exception as exc:  # the Rust tokenizer's errors are plain Exceptions
            raise DataError(f"{where}: the tokenizer could not encode this text ({exc})", hint="check the text of that line") from exc

    def build(self, record: dict, data_format: str, where: str, line: int) -> Example:
        """The example of one record, cut to the character cap before it is tokenized and to seq_len after."""
        cut, example = self._build(record, data_format, where, line)
        example = self._truncate(example)
        if cut:
            example.truncated = True
        return example

    def _build(self, record: dict, data_format: str, where: str, line: int) -> tuple[bool, Example]:
        cut = False
        if data_format == FORMAT_CLASSIFICATION:
            text, cut = cut_text(_require_text(_require_field(record, "text", where, data_format), "text", where), self.chars)
            label = _read_class_label(_require_field(record, "label", where, data_format), self.config.label_names, where)
            ids = self._encode(text, True, where).ids
            return cut, Example(ids, label, line)
        if data_format in data_ner.FORMATS:
            words, cut = data_ner.cut_words(data_ner.read_labelled(record, data_format, self.config.label_names, where), self.chars)
            encoded = self._encode(words.text, True, where)
            return cut, Example(list(encoded.ids), data_ner.token_labels(encoded, words), line)

        eos_id = self.tokenizer.eos_token_id
        mask = self.mask_prompt_for(data_format)
        if data_format == FORMAT_TEXT:
            text, cut = cut_text(_require_text(_require_field(record, "text", where, data_format), "text", where), self.chars)
            encoded = self._encode(text, True, where)
            labels = _labels_for_spans(encoded, None)
            ids = list(encoded.ids)
            _append_eos(ids, labels, eos_id, learn=True)
        elif data_format == FORMAT_PROMPT_COMPLETION:
            prompt = _require_text(_require_field(record, "prompt", where, data_format), "prompt", where)
            completion = _require_text(_require_field(record, "completion", where, data_format), "completion", where)
            prompt, completion, cut = cut_prompt_completion(prompt, completion, self.chars)
            text = prompt + completion
            encoded = self._encode(text, True, where)
            labels = _labels_for_spans(encoded, [(len(prompt), len(text))] if mask else None)
            ids = list(encoded.ids)
            _append_eos(ids, labels, eos_id, learn=True)
        else:
            messages, cut = cut_messages(_read_messages(record, where), self.chars, self.config.max_turns)
            try:
                template = self.tokenizer.compiled_chat_template
                template.allow_chars(2 * self.chars)  # a raised --max-example-chars raises the template's cap with it
                rendered = template.render_with_assistant_spans(messages)
            except TemplateError as exc:
                raise TemplateError(f"{where}: {exc.message}", hint=exc.hint) from exc
            encoded = self._encode(rendered.text, False, where)
            labels = _labels_for_spans(encoded, rendered.assistant_spans if mask else None)
            ids = list(encoded.ids)
        if labels:
            labels[0] = IGNORE_INDEX  # nothing predicts an example's first token
        return cut, Example(ids, labels, line)

    def _truncate(self, example: Example) -> Example:
        limit = self.config.seq_len
        if len(example.input_ids) <= limit:
            return example
        labels = example.labels if isinstance(example.labels, int) else example.labels[:limit]
        return Example(example.input_ids[:limit], labels, example.line, truncated=True)


def _stats(path: Path, data_format: str, task: str, examples: list[Example], num_lines: int, num_without_labels: int, batch_size: int) -> DataStats:
    if task == TASK_SEQ_CLS:
        label_tokens = len(examples)
    else:
        label_tokens = sum(example.num_label_tokens for example in examples)
    return DataStats(
        path=str(path),
        format=data_format,
        num_lines=num_lines,
        num_examples=len(examples),
        num_truncated=sum(1 for example in examples if example.truncated),
        num_without_labels=num_without_labels,
        num_tokens=sum(len(example.input_ids) for example in examples),
        num_label_tokens=label_tokens,
        longest_example_tokens=max((len(example.input_ids) for example in examples), default=0),
        fewer_examples_than_batch_size=len(examples) < batch_size,
    )


def load_dataset(path: Path | str, tokenizer: "TextTokenizer", config: DataConfig) -> TokenizedDataset:
    """Read, validate and tokenize a JSONL file. Bad data raises DataError naming the file and line."""
    path = Path(path)
    reader = JsonlReader(path, config.line_bytes)  # one line at a time, none longer than the cap
    builder = _ExampleBuilder(tokenizer, config)
    file_format: str | None = None
    first_line = 0
    examples: list[Example] = []
    num_without_labels = 0
    for line, record in reader:
        where = f"{path}, line {line}"
        data_format = _detect_format(record, config.task, where)
        if file_format is None:
            file_format, first_line = data_format, line
        elif data_format != file_format:
            raise DataError(
                f"{where}: this line is in {data_format} format, but line {first_line} is in {file_format} format",
                hint="use one format per file",
            )
        example = builder.build(record, data_format, where, line)
        if config.task != TASK_SEQ_CLS and example.num_label_tokens == 0:
            num_without_labels += 1
            continue
        examples.append(example)
    assert file_format is not None
    sha256 = reader.sha256
    stats = _stats(path, file_format, config.task, examples, reader.num_records, num_without_labels, config.batch_size)
    if not examples:
        truncated_note = f"; examples longer than seq_len={config.seq_len} are cut at the end" if config.task == TASK_CAUSAL_LM else ""
        raise DataError(
            f"{path}: no token left to learn from: all {num_without_labels} examples have no label after masking and truncation{truncated_note}",
            hint="raise --seq-len, make sure completions / assistant replies are not empty, or turn prompt masking off",
        )
    pad_id = tokenizer.pad_token_id
    return TokenizedDataset(path, sha256, file_format, config.task, examples, stats, 0 if pad_id is None else pad_id)


def split_validation(dataset: TokenizedDataset, fraction: float, seed: int, batch_size: int | None = None) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Hold out round(fraction * N) examples (at least 1) chosen by `seed`; both parts keep file order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ConfigError(f"the validation fraction must lie strictly between 0 and 1, got {fraction!r}")
    count = len(dataset.examples)
    num_valid = max(1, int(round(fraction * count)))
    if num_valid >= count:
        raise DataError(
            f"{dataset.path}: {count} examples are too few to hold out a validation fraction of {fraction}",
            hint="add examples, lower --valid-fraction, or pass a separate --valid file",
        )
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(count)
    valid_indices = set(order[:num_valid].tolist())
    parts = []
    for keep_valid in (False, True):
        examples = [ex for i, ex in enumerate(dataset.examples) if (i in valid_indices) == keep_valid]
        stats = _stats(
            dataset.path, dataset.format, dataset.task, examples,
            dataset.stats.num_lines, dataset.stats.num_without_labels, batch_size or 1,
        )
        parts.append(
            TokenizedDataset(dataset.path, dataset.sha256, dataset.format, dataset.task, examples, stats, dataset.pad_token_id)
        )
    return parts[0], parts[1]


# ---- batching -----------------------------------------------------------------------------------


def _pack_rows(examples: list[Example], seq_len: int, seed: int) -> list[list[Example]]:
    """Next-fit packing of the examples, in an order shuffled once by `seed`, into rows of <= seq_len."""
    order = np.random.default_rng([seed, _PACK_STREAM]).permutation(len(examples))
    rows: list[list[Example]] = []
    row: list[Example] = []
    row_length = 0
    for index in order.tolist():
        example = examples[index]
        if row and row_length + len(example.input_ids) > seq_len:
            rows.append(row)
            row, row_length = [], 0
        row.append(example)
        row_length += len(example.input_ids)
    if row:
        rows.append(row)
    return rows


def _length_groups(examples: list[Example], batch_tokens: int, seed: int) -> list[list[int]]:
    """Batches of example indices with similar lengths, each with rows x longest row <= batch_tokens.

    Examples are sorted by length (ties in an order shuffled once by `seed`) and cut greedily, so a
    batch pads each row to nearly its own length; the order of the batches is shuffled per epoch.
    """
    order = np.random.default_rng([seed, _GROUP_STREAM]).permutation(len(examples))
    by_length = sorted(order.tolist(), key=lambda index: len(examples[index].input_ids))
    groups: list[list[int]] = []
    group: list[int] = []
    for index in by_length:
        longest = len(examples[index].input_ids)  # sorted: the newest example is the longest
        if group and (len(group) + 1) * longest > batch_tokens:
            groups.append(group)
            group = []
        group.append(index)
    if group:
        groups.append(group)
    return groups


def _causal_lm_batch(rows: list[list[Example]], pad_id: int) -> Batch:
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    for b, row in enumerate(rows):
        column = 0
        last_position = -1
        for example in row:
            length = len(example.input_ids)
            input_ids[b, column : column + length] = example.input_ids
            labels[b, column : column + length] = example.labels
            attention_mask[b, column : column + length] = 1
            position_ids[b, column : column + length] = np.arange(length)
            column += length
            last_position = length - 1
        # Padding positions continue the last example's count (they are masked; any value works).
        position_ids[b, column:] = np.arange(last_position + 1, last_position + 1 + width - column)
    return Batch(
        inputs={"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels},
        num_examples=sum(len(row) for row in rows),
        num_tokens=int(attention_mask.sum()),
        num_label_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
    )


def _token_classification_batch(rows: list[list[Example]], pad_id: int) -> Batch:
    """input_ids, attention_mask and per-token labels [batch, seq]; every labelled position carries loss."""
    batch = _causal_lm_batch(rows, pad_id)
    inputs = {name: batch.inputs[name] for name in ("input_ids", "attention_mask", "labels")}
    return Batch(inputs, batch.num_examples, batch.num_tokens, int((inputs["labels"] != IGNORE_INDEX).sum()))


def _classification_batch(rows: list[list[Example]], pad_id: int) -> Batch:
    examples = [row[0] for row in rows]
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(examples), width), dtype=np.int64)
    for b, example in enumerate(examples):
        input_ids[b, : len(example.input_ids)] = example.input_ids
        attention_mask[b, : len(example.input_ids)] = 1
    labels = np.asarray([ex.labels for ex in examples], dtype=np.int64)
    return Batch(
        inputs={"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
        num_examples=len(examples),
        num_tokens=int(attention_mask.sum()),
        num_label_tokens=len(examples),
    )


class BatchIterator:
    """Deterministic batches of a dataset: rows (packed or single examples) shuffled per epoch.

    `batches(start)` runs over epochs without end and yields (batch, position of the next batch);
    starting from a saved position yields exactly what an uninterrupted run would have yielded.
    The last batch of an epoch may be smaller than batch_size. With `batch_tokens` a batch is a fixed
    group of examples of similar length (see `_length_groups`) and batch_size plays no part.
    """

    def __init__(self, dataset: TokenizedDataset, config: DataConfig, shuffle: bool | None = None):
        if not dataset.examples:
            raise DataError(f"{dataset.path}: no examples to batch", hint="check the data file")
        self.dataset = dataset
        self.config = config
        self.shuffle = config.shuffle if shuffle is None else shuffle
        self.pad_token_id = dataset.pad_token_id
        if config.pack:
            self.rows = _pack_rows(dataset.examples, config.seq_len, config.seed)
        else:
            self.rows = [[example] for example in dataset.examples]
        # With batch_tokens the batches are fixed groups of rows (shuffled as wholes); else batch_size rows.
        self.groups = _length_groups(dataset.examples, config.batch_tokens, config.seed) if config.batch_tokens else None
        self.batches_per_epoch = len(self.groups) if self.groups is not None else math.ceil(len(self.rows) / config.batch_size)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        settings = {
            "sha256": self.dataset.sha256,
            "lines": hashlib.sha256(",".join(str(ex.line) for ex in self.dataset.examples).encode()).hexdigest(),
            "seq_len": self.config.seq_len,
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
            "pack": self.config.pack,
            "mask_prompt": self.config.mask_prompt,
            "shuffle": self.shuffle,
            "task": self.config.task,
            **({"batch_tokens": self.config.batch_tokens} if self.config.batch_tokens else {}),
            **({"max_example_chars": self.config.max_example_chars} if self.config.max_example_chars else {}),
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def row_order(self, epoch: int) -> np.ndarray:
        """The order of rows (of length groups, with batch_tokens) in `epoch`: a permutation seeded by
        (seed, epoch), or file order. Length groups in file order go by their first example in the file,
        so that the first batches of an evaluation (`--max-eval-batches`) are not just the shortest ones."""
        count = len(self.groups) if self.groups is not None else len(self.rows)
        if not self.shuffle:
            if self.groups is not None:
                return np.argsort([min(group) for group in self.groups], kind="stable")
            return np.arange(count)
        return np.random.default_rng([self.config.seed, _SHUFFLE_STREAM, epoch]).permutation(count)

    def batch(self, epoch: int, batch_index: int, order: np.ndarray | None = None) -> Batch:
        order = self.row_order(epoch) if order is None else order
        if self.groups is not None:
            rows = [self.rows[i] for i in self.groups[int(order[batch_index])]]
        else:
            size = self.config.batch_size
            rows = [self.rows[i] for i in order[batch_index * size : (batch_index + 1) * size].tolist()]
        if self.config.task == TASK_SEQ_CLS:
            return _classification_batch(rows, self.pad_token_id)
        if self.config.task == TASK_TOKEN_CLS:
            return _token_classification_batch(rows, self.pad_token_id)
        return _causal_lm_batch(rows, self.pad_token_id)

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """Every batch of one epoch, in that epoch's order."""
        order = self.row_order(epoch)
        for batch_index in range(self.batches_per_epoch):
            yield self.batch(epoch, batch_index, order)

    def batches(self, start: LoaderPosition | None = None) -> Iterator[tuple[Batch, LoaderPosition]]:
        """Batches from `start` (default: the beginning) on, each with the position that follows it."""
        position = start or LoaderPosition()
        if position.fingerprint is not None and position.fingerprint != self.fingerprint:
            raise RunError(
                "the saved data position belongs to other data or batching settings",
                hint="resume with the same data file, seq_len, batch size, seed and packing as the run began with",
            )
        epoch, batch_index = position.epoch, position.batch_index
        while True:
            if batch_index >= self.batches_per_epoch:
                epoch, batch_index = epoch + 1, 0
            order = self.row_order(epoch)
            while batch_index < self.batches_per_epoch:
                batch = self.batch(epoch, batch_index, order)
                batch_index += 1
                yield batch, LoaderPosition(epoch, batch_index, self.fingerprint)


def iter_eval_batches(dataset: TokenizedDataset, config: DataConfig, max_batches: int | None = None) -> Iterator[Batch]:
    """One pass over `dataset` in file order (packed if the config packs), for evaluation."""
    iterator = BatchIterator(dataset, config, shuffle=False)
    for count, batch in enumerate(iterator.epoch_batches(0)):
        if max_batches is not None and count >= max_batches:
            return
        yield batch


def load_train_and_valid(
    train_path: Path | str,
    tokenizer: "TextTokenizer",
    config: DataConfig,
    valid_path: Path | str | None = None,
    valid_fraction: float | None = None,
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """The training data and its validation data: a separate file, a held-out fraction, or none."""
    if valid_path is not None and valid_fraction is not None:
        raise ConfigError("give either a validation file or a validation fraction, not both")
    train = load_dataset(train_path, tokenizer, config)
    if valid_path is not None:
        return train, load_dataset(valid_path, tokenizer, config)
    if valid_fraction is not None:
        return split_validation(train, valid_fraction, config.seed, config.batch_size)
    return train, None
