"""A click path type whose failures are ortft's own `error:` / `what to do:` messages (exit code 2).

click.Path's checks (exists, file or folder) stay; their failure becomes an InputNotFoundError naming the
option and the path, with a hint saying what the option takes, instead of click's "Error: Invalid value".
"""

from __future__ import annotations

import os

import click

from .errors import InputNotFoundError


class InputPath(click.Path):
    """click.Path(exists=True, ...) with a hint for the user when the path is missing or of the wrong kind."""

    def __init__(self, hint: str, *, exists: bool = True, file_okay: bool = True, dir_okay: bool = True, **kwargs):
        super().__init__(exists=exists, file_okay=file_okay, dir_okay=dir_okay, **kwargs)
        self.hint = hint

    def convert(self, value, param, ctx):
        path = os.fspath(value)
        if self.exists and not os.path.exists(path):
            self._refuse(f"{path} does not exist", param)
        if not self.file_okay and os.path.isfile(path):
            self._refuse(f"{path} is a file, not a folder", param)
        if not self.dir_okay and os.path.isdir(path):
            self._refuse(f"{path} is a folder, not a file", param)
        return super().convert(value, param, ctx)

    def fail(self, message: str, param: click.Parameter | None = None, ctx: click.Context | None = None):
        """click.Path's remaining checks (permissions) fail the same way."""
        self._refuse(message.rstrip("."), param)

    def _refuse(self, what: str, param: click.Parameter | None):
        is_option = isinstance(param, click.Option)
        raise InputNotFoundError(f"{param.opts[0]} {what}" if is_option else what, hint=self.hint)
