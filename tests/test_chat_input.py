"""The chat's input: messages continued over lines with a trailing backslash, /reset and /exit, blank lines skipped."""

from __future__ import annotations

import io

from ortft.chat_input import ChatInput, read_chat_input


def read_all(text: str, prompt=None) -> list[ChatInput]:
    stream = io.StringIO(text)
    entries = []
    while True:
        entry = read_chat_input(stream, prompt)
        entries.append(entry)
        if entry.command == "exit":
            return entries


def test_messages_commands_and_continued_lines():
    entries = read_all("hello\nfirst line\\\n  second line\\\nthird\n\n   \n/reset\n  /exit  \nnever read\n")
    assert entries == [ChatInput(message="hello"), ChatInput(message="first line\n  second line\nthird"),
                       ChatInput(command="reset"), ChatInput(command="exit")]


def test_end_of_input_leaves_and_sends_a_message_cut_short():
    assert read_all("") == [ChatInput(command="exit")]
    assert read_all("one\r\nunfinished\\") == [ChatInput(message="one"), ChatInput(message="unfinished"),
                                              ChatInput(command="exit")]


def test_a_command_inside_a_continued_message_is_text():
    assert read_all("see\\\n/reset\n") == [ChatInput(message="see\n/reset"), ChatInput(command="exit")]


def test_prompts_on_a_terminal():
    shown = []
    read_all("a\\\nb\n", prompt=shown.append)
    assert shown == ["> ", "... ", "> "]
