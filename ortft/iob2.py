"""The IOB2 tagging scheme of token classification (NER): tag names, entity types, strict entity spans.

A tag is `O` (outside any entity), `B-TYPE` (the first word of an entity of TYPE) or `I-TYPE` (a
following word of the same entity). Entities are read strictly, as `seqeval` does with
`mode="strict", scheme=IOB2`: an entity starts at a `B-TYPE` and takes every directly following
`I-TYPE` of the same TYPE; an `I-TYPE` that follows no `B-TYPE` or `I-TYPE` of that TYPE starts nothing.
Device side: plain Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

OUTSIDE = "O"
BEGIN = "B-"
INSIDE = "I-"


class Entity(NamedTuple):
    """An entity over words [start, end) of one sequence."""

    type: str
    start: int
    end: int


def entity_type(tag: str) -> tuple[str, str] | None:
    """("B" | "I", TYPE) for `B-TYPE` / `I-TYPE`; None for `O` and for names outside the scheme."""
    if tag.startswith((BEGIN, INSIDE)) and len(tag) > 2:
        return tag[0], tag[2:]
    return None


def is_iob2_label_set(names: Sequence[str]) -> bool:
    """True when every name is `O`, `B-TYPE` or `I-TYPE` and at least one entity type is named."""
    return bool(names) and all(name == OUTSIDE or entity_type(name) is not None for name in names) and bool(entity_types(names))


def entity_types(names: Sequence[str]) -> list[str]:
    """The entity types a label set names, in the order of their first tag."""
    types: list[str] = []
    for name in names:
        parsed = entity_type(name)
        if parsed is not None and parsed[1] not in types:
            types.append(parsed[1])
    return types


def strict_entities(tags: Sequence[str]) -> list[Entity]:
    """The entities of one tag sequence, read strictly (see the module docstring)."""
    entities: list[Entity] = []
    index = 0
    while index < len(tags):
        parsed = entity_type(tags[index])
        if parsed is None or parsed[0] != "B":
            index += 1
            continue
        end = index + 1
        while end < len(tags) and entity_type(tags[end]) == ("I", parsed[1]):
            end += 1
        entities.append(Entity(parsed[1], index, end))
        index = end
    return entities


def tags_of_entities(num_words: int, entities: Sequence[Entity]) -> list[str]:
    """The IOB2 tags of `num_words` words holding non-overlapping `entities`."""
    tags = [OUTSIDE] * num_words
    for entity in entities:
        tags[entity.start] = BEGIN + entity.type
        for index in range(entity.start + 1, entity.end):
            tags[index] = INSIDE + entity.type
    return tags
