"""Type checks for the JSON files ortft reads back (manifests, run.json, trainer_state.json, best.json).

A spec describes what a value must be; `check(value, spec, where, error)` raises `error` (a UserError class)
naming the file and the field (`files["x"].bytes must be a whole number >= 0, found a string`) instead of
letting a wrong type surface later as a traceback. Specs:

    Int(min=0), Number(), Str(), Bool(), Null()    scalars (bool is never a number here)
    Any()                                            anything
    OneOf(spec, spec, ...)                           the first that fits
    ListOf(spec)                                     a JSON array of such values
    MapOf(spec)                                      an object with string keys and such values
    Obj({"key": spec, "key?": spec})                 an object with these keys ("?": optional); others allowed
    Custom(description, predicate)                   a value `predicate` accepts
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any as AnyType


def json_type(value: AnyType) -> str:
    """'a string', 'an array', ...: how a value reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Spec:
    """What a value must be: `description` says it in words, `problem` finds the first misfit."""

    def problem(self, value, path: str) -> tuple[str, str] | None:
        """(path, what it must be) of the first value that does not fit, or None."""
        raise NotImplementedError


@dataclass
class Any(Spec):
    description: str = "anything"

    def problem(self, value, path):
        return None


@dataclass
class Null(Spec):
    description: str = "null"

    def problem(self, value, path):
        return None if value is None else (path, self.description)


@dataclass
class Bool(Spec):
    description: str = "true or false"

    def problem(self, value, path):
        return None if isinstance(value, bool) else (path, self.description)


@dataclass
class Str(Spec):
    max_length: int = 1 << 20

    @property
    def description(self) -> str:
        return "a string"

    def problem(self, value, path):
        if not isinstance(value, str) or len(value) > self.max_length:
            return path, f"a string of at most {self.max_length} characters" if isinstance(value, str) else "a string"
        return None


@dataclass
class Int(Spec):
    min: int | None = None
    max: int | None = None

    @property
    def description(self) -> str:
        bounds = [f">= {self.min}" if self.min is not None else "", f"<= {self.max}" if self.max is not None else ""]
        return "a whole number" + ("".join(f" {b}" for b in bounds if b))

    def problem(self, value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            return path, self.description
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            return path, self.description
        return None


@dataclass
class Number(Spec):
    min: float | None = None

    @property
    def description(self) -> str:
        return "a finite number" + (f" >= {self.min:g}" if self.min is not None else "")

    def problem(self, value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return path, self.description
        if self.min is not None and value < self.min:
            return path, self.description
        return None


class OneOf(Spec):
    def __init__(self, *options: Spec):
        self.options = options

    @property
    def description(self) -> str:
        return " or ".join(option.description for option in self.options)

    def problem(self, value, path):
        if any(option.problem(value, path) is None for option in self.options):
            return None
        return path, self.description


def _first_problem(spec: Spec, items) -> tuple[str, str] | None:
    """The first (path, expected) among `items` ((path, value) pairs) that does not fit `spec`."""
    for path, item in items:
        found = spec.problem(item, path)
        if found:
            return found
    return None


@dataclass
class ListOf(Spec):
    item: Spec
    max_items: int = 1 << 20

    @property
    def description(self) -> str:
        return f"an array of {self.item.description}"

    def problem(self, value, path):
        if not isinstance(value, list) or len(value) > self.max_items:
            return path, self.description
        return _first_problem(self.item, ((f"{path}[{index}]", item) for index, item in enumerate(value)))


@dataclass
class MapOf(Spec):
    item: Spec

    @property
    def description(self) -> str:
        return f"an object whose values are {self.item.description}"

    def problem(self, value, path):
        if not isinstance(value, dict):
            return path, self.description
        return _first_problem(self.item, ((f"{path}[{key!r}]", item) for key, item in value.items()))


@dataclass
class Obj(Spec):
    fields: dict[str, Spec] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return "an object"

    def problem(self, value, path):
        if not isinstance(value, dict):
            return path, self.description
        for key, spec in self.fields.items():
            name, optional = (key[:-1], True) if key.endswith("?") else (key, False)
            where = f"{path}.{name}" if path else name
            if name not in value:
                if optional:
                    continue
                return where, f"present ({spec.description})"
            found = spec.problem(value[name], where)
            if found:
                return found
        return None


@dataclass
class Custom(Spec):
    description: str
    accepts: Callable[[AnyType], bool]

    def problem(self, value, path):
        try:
            ok = self.accepts(value)
        except (TypeError, ValueError):
            ok = False
        return None if ok else (path, self.description)


def check(value, spec: Spec, where: str, error: type[Exception], hint: str | None = None) -> None:
    """Raise `error` naming `where` (the file) and the first field of `value` that does not fit `spec`."""
    found = spec.problem(value, "")
    if found is None:
        return
    path, expected = found
    shown = _lookup(value, path)
    field_text = f"field {path}" if path else "the whole file"
    found_text = "nothing" if shown is _MISSING else json_type(shown)
    raise error(f"{where}: {field_text} must be {expected}, found {found_text}",
                hint=hint or "the file was edited or damaged; make it again with ortft")


_MISSING = object()


def _lookup(value, path: str):
    """The value at `path` (as `problem` writes paths), or a marker when it is absent."""
    import re

    current = value
    for match in re.finditer(r"\.?([^.\[\]]+)|\[(\d+)\]|\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]", path):
        name, index, key = match.groups()
        try:
            if index is not None:
                current = current[int(index)]
            elif key is not None:
                import ast

                current = current[ast.literal_eval(key)]
            else:
                current = current[name]
        except (KeyError, IndexError, TypeError, ValueError, SyntaxError):
            return _MISSING
    return current
