"""Token classification (NER) data: the two JSONL formats, words, and which sub-token carries a word's tag.

Formats (one JSON object per line; see docs/data.md):
    {"tokens": ["Ada", "lives", "in", "Oslo"], "tags": ["B-PER", "O", "O", "B-LOC"]}   CoNLL style (IOB2)
    {"text": "Ada lives in Oslo", "entities": [{"start": 0, "end": 3, "label": "PER"}, ...]}   character spans

Both become a text and its words (character spans): the tokens format joins its tokens with single
spaces, and each token is a word; the spans format splits its text into words (runs of letters and
digits, and each other non-space character alone), also at every entity's start and end, and tags
the words inside an entity B-TYPE, I-TYPE, ... The text is tokenized as a whole; the first sub-token of
a word carries the word's tag and every other token is ignored (-100), as are the tokens the tokenizer
adds (CLS, SEP, BOS). Tags may be label names or indices. Device side: plain Python.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .iob2 import (
    BEGIN,
    INSIDE,
    OUTSIDE,
    Entity,
    entity_types,
    is_iob2_label_set,
    tags_of_entities,
)
from .jsonl import json_type as _json_type

IGNORE_INDEX = -100
FORMAT_TAGGED_TOKENS = "tokens-tags"
FORMAT_ENTITY_SPANS = "text-entities"
FORMATS = (FORMAT_TAGGED_TOKENS, FORMAT_ENTITY_SPANS)
WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class WordText:
    """A text, its words as character spans [start, end), and (for labelled data) each word's label id."""

    text: str
    words: list[tuple[int, int]]
    label_ids: list[int] | None = None


def _string(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, found {_json_type(value)}", hint="fix that line")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: {what} holds an unpaired UTF-16 surrogate escape (such as \\ud800)",
                        hint="remove or fix the escape; it is not a character") from exc
    return value


def _field(record: dict, name: str, where: str, data_format: str) -> Any:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} ({data_format} format)", hint="add the field to that line")
    return record[name]


def detect_format(record: dict, where: str) -> str:
    """The format of a token-cls line: `tokens` (with `tags`) or `text` (with `entities`)."""
    if "tokens" in record:
        return FORMAT_TAGGED_TOKENS
    if "text" in record:
        return FORMAT_ENTITY_SPANS
    keys = ", ".join(sorted(record)) or "none"
    raise DataError(f"{where}: no known field for token classification (found: {keys})",
                    hint='use {"tokens": [...], "tags": [...]} or {"text": ..., "entities": [{"start", "end", "label"}]}')


# ---- words ----------------------------------------------------------------------------------------


def words_of(text: str, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """The words of `text`: runs of letters/digits and single other non-space characters, also split at `cuts`."""
    cuts = sorted(set(cuts))
    words = []
    for match in WORD.finditer(text):
        start, end = match.span()
        inner = cuts[bisect.bisect_right(cuts, start):bisect.bisect_left(cuts, end)]
        bounds = [start, *inner, end]
        words.extend(itertools.pairwise(bounds))
    return words


def joined_tokens(tokens: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The tokens joined by single spaces, and each token's character span in that text."""
    spans, position = [], 0
    for token in tokens:
        spans.append((position, position + len(token)))
        position += len(token) + 1
    return " ".join(tokens), spans


def read_tokens(record: dict, where: str, data_format: str = FORMAT_TAGGED_TOKENS) -> list[str]:
    tokens = _field(record, "tokens", where, data_format)
    if not isinstance(tokens, list):
        raise DataError(f"{where}: 'tokens' must be an array of strings, found {_json_type(tokens)}", hint="fix that line")
    for index, token in enumerate(tokens):
        _string(token, f"token {index}", where)
        if not token.strip():
            raise DataError(f"{where}: token {index} is empty or only whitespace", hint="remove it (and its tag) or fix it")
    return tokens


def unlabelled_words(record: dict, where: str) -> WordText:
    """A prediction input: {"tokens": [...]} (each token a word) or {"text": ...} (split into words)."""
    if "tokens" in record:
        text, words = joined_tokens(read_tokens(record, where, "tokens"))
        return WordText(text, words)
    if "text" in record:
        text = _string(record["text"], "field 'text'", where)
        return WordText(text, words_of(text))
    keys = ", ".join(sorted(record)) or "none"
    raise DataError(f"{where}: no field 'text' or 'tokens' (found: {keys})", hint='give {"text": ...} or {"tokens": [...]} per line')


def cut_words(words: WordText, chars: int) -> tuple[WordText, bool]:
    """The words that end within the first `chars` characters of the text, and whether anything was cut (a
    text is cut before it is tokenized: ortft/data_limits.py)."""
    if len(words.text) <= chars:
        return words, False
    kept = bisect.bisect_right([end for _start, end in words.words], chars)
    labels = words.label_ids[:kept] if words.label_ids is not None else None
    return WordText(words.text[:chars], words.words[:kept], labels), True


# ---- labelled lines -------------------------------------------------------------------------------


def _tag_id(value: Any, label_names: Sequence[str], what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: {what} must be a label name or index, found {_json_type(value)}", hint="fix that line")
    if isinstance(value, str):
        if value not in label_names:
            raise DataError(f"{where}: {what} is an unknown label {value!r}", hint=f"known labels: {', '.join(label_names)}")
        return list(label_names).index(value)
    if not 0 <= value < len(label_names):
        raise DataError(f"{where}: {what} is label index {value}, out of range (expected 0..{len(label_names) - 1})",
                        hint="fix that line")
    return value


def read_tagged_tokens(record: dict, label_names: Sequence[str], where: str) -> WordText:
    """{"tokens": [...], "tags": [...]}: one tag (name or index) per token."""
    tokens = read_tokens(record, where)
    tags = _field(record, "tags", where, FORMAT_TAGGED_TOKENS)
    if not isinstance(tags, list):
        raise DataError(f"{where}: 'tags' must be an array, found {_json_type(tags)}", hint="fix that line")
    if len(tags) != len(tokens):
        raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags", hint="give exactly one tag per token")
    text, words = joined_tokens(tokens)
    label_ids = [_tag_id(tag, label_names, f"tag {index}", where) for index, tag in enumerate(tags)]
    return WordText(text, words, label_ids)


def _span(entity: Any, index: int, length: int, where: str) -> tuple[int, int, str]:
    at = f"{where}, entity {index}"
    if not isinstance(entity, dict):
        raise DataError(f"{at}: must be an object with 'start', 'end' and 'label', found {_json_type(entity)}", hint="fix that line")
    for key in ("start", "end", "label"):
        if key not in entity:
            raise DataError(f"{at}: missing field {key!r}", hint="every entity needs start, end and label")
    start, end = entity["start"], entity["end"]
    for key, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{at}: {key!r} must be a whole number (a character offset), found {_json_type(value)}", hint="fix that line")
    if not 0 <= start < end <= length:
        raise DataError(f"{at}: span [{start}, {end}) lies outside the text (length {length}) or is empty",
                        hint="start and end are character offsets with 0 <= start < end <= len(text)")
    return start, end, _string(entity["label"], "'label'", at)


def read_entity_spans(record: dict, label_names: Sequence[str], where: str) -> WordText:
    """{"text": ..., "entities": [{"start", "end", "label"}]}: the words inside an entity get B-/I- tags."""
    text = _string(_field(record, "text", where, FORMAT_ENTITY_SPANS), "field 'text'", where)
    entities = _field(record, "entities", where, FORMAT_ENTITY_SPANS)
    if not isinstance(entities, list):
        raise DataError(f"{where}: 'entities' must be an array, found {_json_type(entities)}", hint="fix that line")
    if not is_iob2_label_set(label_names) or OUTSIDE not in label_names:
        raise DataError(f"{where}: entity spans need a bundle whose labels are IOB2 tags (O, B-TYPE, I-TYPE); this one has "
                        f"{', '.join(label_names)}", hint="prepare the bundle with --labels O,B-PER,I-PER,..., or give tags per token")
    spans = sorted((*_span(entity, index, len(text), where), index) for index, entity in enumerate(entities))
    for (_s, previous_end, _l, previous), (start, _e, _l2, index) in itertools.pairwise(spans):
        if start < previous_end:
            raise DataError(f"{where}: entities {previous} and {index} overlap", hint="entities must not overlap; keep one of them")
    words = words_of(text, [bound for start, end, _label, _index in spans for bound in (start, end)])
    starts = [start for start, _end in words]
    placed = []
    for start, end, label, index in spans:
        first, last = bisect.bisect_left(starts, start), bisect.bisect_left(starts, end)
        if first == last:
            raise DataError(f"{where}, entity {index}: span [{start}, {end}) holds no word (only spaces)", hint="fix the span")
        needed = [BEGIN + label] + ([INSIDE + label] if last - first > 1 else [])
        unknown = [tag for tag in needed if tag not in label_names]
        if unknown:
            raise DataError(f"{where}, entity {index}: unknown entity label {label!r} (no tag {unknown[0]} in the bundle)",
                            hint=f"entity labels of this bundle: {', '.join(entity_types(label_names))}")
        placed.append(Entity(label, first, last))
    label_ids = [list(label_names).index(tag) for tag in tags_of_entities(len(words), placed)]
    return WordText(text, words, label_ids)


def read_labelled(record: dict, data_format: str, label_names: Sequence[str] | None, where: str) -> WordText:
    if not label_names:
        raise DataError(f"{where}: token classification data needs the bundle's label names", hint="prepare the bundle with --labels")
    if data_format == FORMAT_TAGGED_TOKENS:
        return read_tagged_tokens(record, label_names, where)
    return read_entity_spans(record, label_names, where)


# ---- sub-tokens -----------------------------------------------------------------------------------


def first_subtokens(text: str, offsets: Sequence[tuple[int, int]], added: Sequence[bool], words: Sequence[tuple[int, int]]) -> list[int | None]:
    """For each word, the index of its first sub-token: the first token whose first non-space character
    lies in the word (None when every such character belongs to a token that began in an earlier word)."""
    starts = [start for start, _end in words]
    firsts: list[int | None] = [None] * len(words)
    for index, ((start, end), special) in enumerate(zip(offsets, added)):
        if special:
            continue
        while start < end and text[start].isspace():
            start += 1
        if start >= end:
            continue
        word = bisect.bisect_right(starts, start) - 1
        if word >= 0 and start < words[word][1] and firsts[word] is None:
            firsts[word] = index
    return firsts


def token_labels(encoded, word_text: WordText) -> list[int]:
    """Per-token labels: each word's first sub-token carries the word's label id, every other token -100."""
    labels = [IGNORE_INDEX] * len(encoded.ids)
    firsts = first_subtokens(word_text.text, encoded.offsets, encoded.added_by_post_processor, word_text.words)
    for word, token in enumerate(firsts):
        if token is not None:
            labels[token] = word_text.label_ids[word]
    return labels
