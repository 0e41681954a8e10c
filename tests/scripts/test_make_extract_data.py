"""scripts/make_extract_data.py: deterministic output equal to the committed data/extract/, JSON replies that
match their messages, and held-out names and towns that never occur in train."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_extract_data.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ortft_make_extract_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_chats(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_output_is_deterministic_and_equals_the_committed_files(tmp_path):
    for out in (tmp_path / "first", tmp_path / "second"):
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True, timeout=120)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        written = (tmp_path / "first" / "extract" / name).read_bytes()
        assert written == (tmp_path / "second" / "extract" / name).read_bytes(), name
        assert written == (ROOT / "data" / "extract" / name).read_bytes(), f"data/extract/{name} is stale: rerun the script"


def test_replies_are_compact_json_objects_taken_from_their_message():
    script = load_script()
    for name, size in script.SIZES.items():
        chats = read_chats(ROOT / "data" / "extract" / name)
        assert len(chats) == size
        for chat in chats:
            user, assistant = chat["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            instruction, message = user["content"].split("\n\n")
            assert instruction == script.INSTRUCTION
            fields = json.loads(assistant["content"])
            assert tuple(fields) == script.KEYS
            assert assistant["content"] == json.dumps(fields)
            assert fields["name"] in message and fields["town"] in message and fields["day"] in message
            assert isinstance(fields["guests"], int)
            assert str(fields["guests"]) in message or script.NUMBER_WORDS[fields["guests"]] in message


def test_held_out_names_and_towns_never_occur_in_train_and_no_prompt_repeats():
    script = load_script()
    train_text = (ROOT / "data" / "extract" / "train.jsonl").read_text(encoding="utf-8")
    held_out = script.FIRST_NAMES["held_out"] + script.LAST_NAMES["held_out"] + script.TOWNS["held_out"]
    assert [value for value in held_out if value in train_text] == []
    training_values = script.FIRST_NAMES["train"] + script.LAST_NAMES["train"] + script.TOWNS["train"]
    prompts = []
    for name in ("valid.jsonl", "test.jsonl"):
        for chat in read_chats(ROOT / "data" / "extract" / name):
            fields = json.loads(chat["messages"][1]["content"])
            first, last = fields["name"].split(" ")
            assert first in script.FIRST_NAMES["held_out"] and last in script.LAST_NAMES["held_out"]
            assert fields["town"] in script.TOWNS["held_out"]
            assert not [value for value in training_values if value in chat["messages"][0]["content"]]
            prompts.append(chat["messages"][0]["content"])
    prompts += [chat["messages"][0]["content"] for chat in read_chats(ROOT / "data" / "extract" / "train.jsonl")]
    assert len(prompts) == len(set(prompts))
