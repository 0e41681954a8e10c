"""The `ortft` command line: a click group whose commands live one per module in ortft/commands/.

Each command parses its options, builds a config and calls one function. User errors
(`ortft.errors.UserError`) are printed as one message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click

from . import __version__
from .errors import UserError

# command name -> module in ortft.commands that defines `command` (a click.Command).
COMMAND_MODULES = {
    "doctor": "doctor",
    "prepare": "prepare",
    "validate": "validate",
    "upgrade": "upgrade",
    "info": "info",
    "train": "train",
    "eval": "evaluate",
    "report": "report",
    "export": "export",
    "generate": "generate",
    "predict": "predict",
    "federate": "federate",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command (or the help listing) needs it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMAND_MODULES if self._module_exists(name)]

    @staticmethod
    def _module_exists(name: str) -> bool:
        return importlib.util.find_spec(f"ortft.commands.{COMMAND_MODULES[name]}") is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMAND_MODULES or not self._module_exists(name):
            return None
        module = importlib.import_module(f"ortft.commands.{COMMAND_MODULES[name]}")
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ortft")
def cli() -> None:
    """Fine-tune language models on edge devices with stock ONNX Runtime: no GPU, no PyTorch on the device.

    \b
    Host:    ortft prepare MODEL --out BUNDLE      (needs the [prepare] extra: torch, transformers)
    Device:  ortft train BUNDLE --data train.jsonl --out RUN
             ortft eval / export / generate / predict / validate / upgrade / info / report
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: runs the group, turning user errors into exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        cli.main(args=argv, prog_name="ortft", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"  what to do: {exc.hint}", err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # a bad, missing or unknown option: said the ortft way, exit code 2
        click.echo(f"error: {usage_problem(exc)}", err=True)
        command_path = exc.ctx.command_path if exc.ctx is not None else "ortft"
        click.echo(f"  what to do: see `{command_path} --help`", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def usage_problem(exc: click.UsageError) -> str:
    """click's message for a usage error, without its "Invalid value for" wrapping: `--format: 'x' is not one of ...`."""
    if isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter):
        where = exc.param_hint or (exc.param.get_error_hint(exc.ctx) if exc.param is not None and exc.ctx is not None else None)
        if isinstance(where, str):
            return f"{where.replace(chr(39), '')}: {exc.message.rstrip('.')}"
    return exc.format_message().rstrip(".")
