"""What a training run tells its user, through a reporter the caller supplies (the CLI's prints; the default logs).

Core modules never print: `ortft.train.train` calls `note` (a fact about the data or the bundle, once
per run), `message` (an event such as the first evaluation or a signal), and `start`/`step`/`close` around
the steps; `ortft/commands/train.py` supplies a reporter that writes to the terminal.
"""

from __future__ import annotations

import logging

log = logging.getLogger("ortft.train")


class TrainReporter:
    """Says nothing: the base of every reporter, and what a caller that wants silence passes."""

    def note(self, text: str) -> None:
        """A fact the user should know about this run (truncated examples, an old bundle, ...)."""

    def message(self, text: str) -> None:
        """An event of the run: the first evaluation's loss, a signal being handled."""

    def start(self, total_steps: int, first_step: int) -> None:
        """The loop begins at `first_step` (0, or a resumed checkpoint's) of `total_steps`."""

    def step(self, record: dict) -> None:
        """One optimizer step finished; `record` is its metrics.jsonl record (step, loss, lr, tokens_per_s, ...)."""

    def close(self) -> None:
        """The loop ended (finished, stopped or failed)."""


class LogReporter(TrainReporter):
    """Notes to the `ortft.train` log at `note_level` (WARNING by default), messages at INFO; no progress."""

    def __init__(self, note_level: int = logging.WARNING):
        self.note_level = note_level

    def note(self, text: str) -> None:
        log.log(self.note_level, "note: %s", text)

    def message(self, text: str) -> None:
        log.info("%s", text.strip())
