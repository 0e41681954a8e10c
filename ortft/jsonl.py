"""Strict JSON Lines, read a line at a time: a file of any size costs one line of memory, and no line may be
longer than a byte cap (a 20 MB line is refused before it is decoded, parsed or tokenized).

`JsonlReader(path, max_line_bytes)` yields (line number, object) and knows the file's sha256 once it has
been read to the end. Accepted: a UTF-8 byte-order mark, CRLF line ends, blank lines, a missing newline
at the very end. Refused with a DataError naming the file and line: bytes that are not UTF-8, a line
that is not one JSON object, NaN/Infinity or numbers too large for a float, a line over the cap, a cut-off
last line, an empty file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

UTF8_BOM = b"\xef\xbb\xbf"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a finite float")
    return value


def parse_json_line(text: str) -> Any:
    """json.loads without NaN, Infinity or floats that overflow."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class JsonlReader:
    """Iterate over (line number, object) of a JSONL file; `sha256` is the file's digest after a full pass."""

    def __init__(self, path: Path | str, max_line_bytes: int | None = None, cap_hint: str = "raise --max-example-chars"):
        self.path = Path(path)
        self.max_line_bytes = max_line_bytes
        self.cap_hint = cap_hint
        self.sha256: str | None = None
        self.num_records = 0

    def _lines(self) -> Iterator[tuple[int, bytes, bool]]:
        """(line number, bytes without the line end, whether a line end followed) per line; hashes as it reads."""
        digest = hashlib.sha256()
        limit = self.max_line_bytes
        with self._open() as handle:
            number = 0
            while True:
                try:
                    raw = handle.readline(limit + 2) if limit else handle.readline()  # + the line end (\r\n)
                except OSError as exc:
                    raise DataError(f"cannot read data file {self.path}: {exc.strerror or exc}", hint="check the file") from exc
                if not raw:
                    break
                digest.update(raw)
                number += 1
                ended = raw.endswith(b"\n")
                body = raw[:-1] if ended else raw
                body = body[:-1] if body.endswith(b"\r") else body
                if number == 1 and body.startswith(UTF8_BOM):
                    body = body[len(UTF8_BOM):]
                if limit and len(body) > limit:
                    raise DataError(f"{self.path}, line {number}: longer than {limit} bytes, the most ortft reads for one example",
                                    hint=f"shorten or split that example, or {self.cap_hint}")
                yield number, body, ended
        self.sha256 = digest.hexdigest()

    def _open(self):
        try:
            return open(self.path, "rb")  # closed by the caller's `with`
        except OSError as exc:
            raise DataError(f"cannot read data file {self.path}: {exc.strerror or exc}", hint="check the path given to --data") from exc

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        for number, line_bytes, ended in self._lines():
            where = f"{self.path}, line {number}"
            try:
                text = line_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 (bad byte at column {exc.start + 1})", hint="save the file as UTF-8") from exc
            if not text.strip():
                continue
            try:
                value = parse_json_line(text)
            except (ValueError, RecursionError) as exc:
                if not ended:
                    raise DataError(
                        f"{where}: the last line is incomplete JSON and has no line end; the file looks truncated ({exc})",
                        hint="the file was probably cut off while being written or copied; write it again",
                    ) from exc
                reason = "JSON nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                raise DataError(f"{where}: not valid JSON ({reason})",
                                hint="each line must be one JSON object; NaN and Infinity are not allowed") from exc
            if not isinstance(value, dict):
                raise DataError(
                    f"{where}: expected a JSON object, found {json_type(value)}",
                    hint='each line must be an object such as {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}',
                )
            self.num_records += 1
            yield number, value
        if not self.num_records:
            raise DataError(f"{self.path} is empty (no JSON lines)", hint="give a JSONL file with one example per line")
