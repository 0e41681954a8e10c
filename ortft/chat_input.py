"""The user's side of `ortft generate --chat`: messages read from a terminal or a pipe, and the chat's commands.

A line ending in a backslash continues the message on the next line (the backslash becomes a line break);
`/reset` starts a new conversation; `/exit`, `/quit` or the end of input (Ctrl-D) leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TextIO

CONTINUE_MARK = "\\"
RESET_COMMANDS = ("/reset",)
EXIT_COMMANDS = ("/exit", "/quit")

CHAT_HELP = ("chat: type a message and press Enter; end a line with \\ to go on to the next line; "
             "/reset starts a new conversation; /exit or Ctrl-D leaves")


@dataclass
class ChatInput:
    """One thing the user typed: a message, or one of the chat's commands ("reset", "exit")."""

    command: str | None = None
    message: str = ""


def read_chat_input(stream: TextIO, prompt: Callable[[str], None] | None = None) -> ChatInput:
    """The next message (its continued lines joined by line breaks) or command from `stream`; "exit" at its end.

    `prompt(text)`, if given, shows "> " before a message and "... " before each continued line (a terminal).
    Blank messages are skipped.
    """
    while True:
        lines: list[str] = []
        while True:
            if prompt is not None:
                prompt("... " if lines else "> ")
            line = stream.readline()
            if not line:  # end of input; a message cut short by it is still sent
                return ChatInput(message="\n".join(lines)) if "".join(lines).strip() else ChatInput(command="exit")
            line = line.rstrip("\r\n")
            if line.endswith(CONTINUE_MARK):
                lines.append(line[: -len(CONTINUE_MARK)])
                continue
            lines.append(line)
            break
        text = "\n".join(lines)
        word = text.strip()
        if len(lines) == 1 and word in RESET_COMMANDS:
            return ChatInput(command="reset")
        if len(lines) == 1 and word in EXIT_COMMANDS:
            return ChatInput(command="exit")
        if word:
            return ChatInput(message=text)
