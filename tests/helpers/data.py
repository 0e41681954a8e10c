"""Data files for the tests: JSONL lines a tiny model can learn."""

from __future__ import annotations

import json
from pathlib import Path

_WORDS = ["Paris", "France", "hello", "world", "capital", "answer", "six", "seven"]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_text_data(path: Path, count: int, offset: int = 0) -> Path:
    """`count` short {"text": ...} lines that a tiny model can learn (recurring words and patterns)."""
    lines = []
    for i in range(offset, offset + count):
        lines.append(json.dumps({"text": f"The capital of {_WORDS[i % 8]} is {_WORDS[(i * 3) % 8]}. Answer: {i * 7}. hello world"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
