"""Answer held-out chats with the base model and the fine-tuned export, side by side, and score both (device side).

Run: python scripts/demo_compare.py BUNDLE EXPORT_DIR HELD_OUT_JSONL [--show 4] [--max-new-tokens 64]
HELD_OUT_JSONL holds chats whose last message is the expected assistant reply, a JSON object (as in
data/extract/test.jsonl). Scores: exact match (the reply parses to exactly the expected object: same keys,
values and types) and field accuracy (the share of expected fields whose value is right; case and
surrounding spaces ignored, "3" counts as 3). A reply with no JSON object in it gets every field wrong.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Score:
    """How one reply compares with its expected object."""

    exact: bool
    fields_right: int
    fields_total: int
    parsed: bool


def parse_reply(reply: str) -> dict | None:
    """The first JSON object in reply (code fences and chatter around it are allowed), or None."""
    decoder = json.JSONDecoder()
    start = reply.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(reply, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = reply.find("{", start + 1)
    return None


def comparable(value) -> str:
    return str(value).strip().casefold()


def same_field_value(got, expected) -> bool:
    """True when got is expected, ignoring case, surrounding spaces and a number written as a string."""
    return not isinstance(got, (dict, list)) and got is not None and comparable(got) == comparable(expected)


def score_reply(reply: str, expected: dict) -> Score:
    parsed = parse_reply(reply)
    if parsed is None:
        return Score(exact=False, fields_right=0, fields_total=len(expected), parsed=False)
    right = sum(key in parsed and same_field_value(parsed[key], value) for key, value in expected.items())
    return Score(exact=parsed == expected, fields_right=right, fields_total=len(expected), parsed=True)


def summarize(scores: list[Score]) -> str:
    count = len(scores)
    exact = sum(score.exact for score in scores)
    right = sum(score.fields_right for score in scores)
    total = sum(score.fields_total for score in scores)
    parsed = sum(score.parsed for score in scores)
    return (f"exact match {exact}/{count} ({exact / count:.0%}), field accuracy {right}/{total} ({right / total:.0%}), "
            f"JSON object found in {parsed}/{count}")


def read_held_out(path: Path) -> list[tuple[list[dict], dict]]:
    """(messages up to the last user turn, the expected object) for every chat of path."""
    chats = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            chats.append((messages[:-1], json.loads(messages[-1]["content"])))
    return chats


def answer(generator, messages: list[dict], max_new_tokens: int) -> str:
    from ortft.generate import SamplingSettings

    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    return "".join(generator.stream_chat(messages, settings)).strip()


def print_side_by_side(messages: list[dict], expected: dict, replies: dict[str, tuple[str, Score]], width: int) -> None:
    print("=" * width)
    message = messages[-1]["content"].split("\n\n", 1)[-1]
    print(textwrap.fill(f"message:  {message}", width, subsequent_indent=" " * 10))
    print(f"expected: {json.dumps(expected, ensure_ascii=False)}")
    for label, (reply, score) in replies.items():
        verdict = "exact" if score.exact else f"{score.fields_right}/{score.fields_total} fields"
        print(textwrap.fill(f"{label + ':':<9} {' '.join(reply.split())}  [{verdict}]", width, subsequent_indent=" " * 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the training bundle (its base model answers 'before')")
    parser.add_argument("export", type=Path, help="the merged-onnx export (answers 'after')")
    parser.add_argument("held_out", type=Path, help="chat JSONL whose last message is the expected JSON reply")
    parser.add_argument("--show", type=int, default=4, help="chats to print side by side (all are scored)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from ortft.generate import open_generator

    generators = {"before": open_generator(args.bundle), "after": open_generator(args.export)}
    scores: dict[str, list[Score]] = {label: [] for label in generators}
    width = 100
    for index, (messages, expected) in enumerate(read_held_out(args.held_out)):
        replies = {}
        for label, generator in generators.items():
            reply = answer(generator, messages, args.max_new_tokens)
            replies[label] = (reply, score_reply(reply, expected))
            scores[label].append(replies[label][1])
        if index < args.show:
            print_side_by_side(messages, expected, replies, width)
    print("=" * width)
    print(f"held-out chats ({args.held_out}):")
    for label, label_scores in scores.items():
        print(f"  {label + ':':<8}{summarize(label_scores)}")
    print(f"generation speed (after): {generators['after'].stats.summary()}")


if __name__ == "__main__":
    main()
