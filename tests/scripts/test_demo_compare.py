"""scripts/demo_compare.py: the scorer of JSON replies, and the printed before/after scores (with stand-in
generators; the real model runs in scripts/demo.sh)."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"name": "Nadira Quintero", "town": "Lake Thessaly", "day": "Wednesday", "guests": 7}


@functools.cache
def load_script():
    spec = importlib.util.spec_from_file_location("ortft_demo_compare", ROOT / "scripts" / "demo_compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_exact_object_scores_exact_and_every_field():
    score = load_script().score_reply(json.dumps(EXPECTED), EXPECTED)
    assert (score.exact, score.fields_right, score.fields_total, score.parsed) == (True, 4, 4, True)


def test_fields_are_scored_one_by_one_and_leniently_but_exact_match_is_strict():
    compare = load_script()
    reply = 'Sure! ```json\n{"name": "nadira quintero ", "town": "Lake Thessaly", "day": "Friday", "guests": "7"}\n```'
    score = compare.score_reply(reply, EXPECTED)
    assert (score.exact, score.fields_right, score.parsed) == (False, 3, True)  # the day is wrong
    extra_key = compare.score_reply(json.dumps({**EXPECTED, "note": "none"}), EXPECTED)
    assert (extra_key.exact, extra_key.fields_right) == (False, 4)
    nested = compare.score_reply('{"booking": ' + json.dumps(EXPECTED) + "}", EXPECTED)
    assert (nested.exact, nested.fields_right) == (False, 0)
    missing_and_null = compare.score_reply('{"name": null, "town": ["Lake Thessaly"]}', EXPECTED)
    assert missing_and_null.fields_right == 0


def test_a_reply_without_a_json_object_gets_every_field_wrong():
    compare = load_script()
    for reply in ("", "The booking is for Nadira Quintero in Lake Thessaly.", '{"name": "Nadira Quintero"', "[1, 2]"):
        score = compare.score_reply(reply, EXPECTED)
        assert (score.exact, score.fields_right, score.parsed) == (False, 0, False), reply
    # An unparsable brace before a good object: the good object is found.
    assert compare.score_reply("{oops} " + json.dumps(EXPECTED), EXPECTED).exact


def test_summary_counts_exact_matches_fields_and_parsed_replies():
    compare = load_script()
    scores = [compare.Score(True, 4, 4, True), compare.Score(False, 2, 4, True), compare.Score(False, 0, 4, False),
              compare.Score(False, 3, 4, True)]
    assert compare.summarize(scores) == "exact match 1/4 (25%), field accuracy 9/16 (56%), JSON object found in 3/4"


class StandInGenerator:
    """Answers every chat with a fixed reply, like ortft.generate.Generator.stream_chat does with a model."""

    class stats:  # noqa: N801 - mirrors Generator.stats
        @staticmethod
        def summary() -> str:
            return "stand-in"

    def __init__(self, reply):
        self.reply = reply

    def stream_chat(self, messages, settings):
        yield self.reply(messages)


def test_main_prints_side_by_side_and_scores_before_and_after(tmp_path, monkeypatch, capsys):
    import ortft.generate

    compare = load_script()
    held_out = ROOT / "data" / "extract" / "test.jsonl"
    chats = compare.read_held_out(held_out)
    expected_by_message = {messages[-1]["content"]: json.dumps(expected) for messages, expected in chats}
    generators = {
        "bundle": StandInGenerator(lambda messages: "I cannot help with bookings."),
        "export": StandInGenerator(lambda messages: expected_by_message[messages[-1]["content"]]),
    }
    monkeypatch.setattr(ortft.generate, "open_generator", lambda path: generators[Path(path).name])
    monkeypatch.setattr(sys, "argv", ["demo_compare.py", str(tmp_path / "bundle"), str(tmp_path / "export"), str(held_out),
                                      "--show", "2"])
    compare.main()
    printed = capsys.readouterr().out
    count = len(chats)
    assert printed.count("expected: ") == 2
    assert f"before: exact match 0/{count} (0%), field accuracy 0/{4 * count} (0%), JSON object found in 0/{count}" in printed
    assert f"after:  exact match {count}/{count} (100%), field accuracy {4 * count}/{4 * count} (100%)" in printed
