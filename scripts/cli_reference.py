"""Keep the `--help` blocks of docs/cli.md equal to what the commands print.

Run: .venv/bin/python scripts/cli_reference.py [--check] [--doc docs/cli.md]
docs/cli.md is written by hand except between marker pairs
    <!-- ortft-cli:begin COMMAND -->  ...  <!-- ortft-cli:end COMMAND -->
(COMMAND as typed after `ortft`, e.g. `train` or `federate local`), which this script fills with that
command's `--help` text at a fixed width. Every command and subcommand must have one block. With
--check nothing is written: it lists the stale or missing blocks and exits with 1
(tests/scripts/test_cli_reference.py runs it so).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click

from ortft.cli import cli
from ortft.fsutil import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOC = ROOT / "docs" / "cli.md"
HELP_WIDTH = 100
BLOCK = re.compile(
    r"<!-- ortft-cli:begin (?P<name>[a-z -]+?) -->\n(?P<body>.*?)<!-- ortft-cli:end (?P=name) -->",
    re.DOTALL,
)


def command_names(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[str]:
    """Every command path below `group` in listing order: 'train', 'federate', 'federate local', ..."""
    names = []
    context = click.Context(group, info_name="ortft")
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        path = (*prefix, name)
        names.append(" ".join(path))
        if isinstance(command, click.Group):
            names.extend(command_names(command, path))
    return names


def help_text(name: str) -> str:
    """What `ortft NAME --help` prints, wrapped at HELP_WIDTH columns whatever the terminal."""
    context = click.Context(cli, info_name="ortft", terminal_width=HELP_WIDTH, max_content_width=HELP_WIDTH,
                            **cli.context_settings)  # -h beside --help; subcommands inherit it
    command: click.Command = cli
    for part in name.split():
        assert isinstance(command, click.Group), name
        sub = command.get_command(context, part)
        if sub is None:
            raise KeyError(name)
        command = sub
        context = click.Context(command, info_name=part, parent=context,
                                terminal_width=HELP_WIDTH, max_content_width=HELP_WIDTH)
    return command.get_help(context).rstrip() + "\n"


def render_block(name: str) -> str:
    """The text between one marker pair."""
    return f"```text\n$ ortft {name} --help\n{help_text(name)}```\n"


def refresh(document: str) -> tuple[str, list[str]]:
    """The document with every block rendered anew, and the problems found (stale, missing, unknown)."""
    known = command_names()
    problems = []
    seen = set()

    def replace(match: re.Match) -> str:
        name = match["name"]
        seen.add(name)
        if name not in known:
            problems.append(f"a block for `ortft {name}`, which is no command")
            return match[0]
        body = render_block(name)
        if match["body"] != body:
            problems.append(f"the block of `ortft {name}` is stale")
        return f"<!-- ortft-cli:begin {name} -->\n{body}<!-- ortft-cli:end {name} -->"

    updated = BLOCK.sub(replace, document)
    problems.extend(f"no block for `ortft {name}`: add <!-- ortft-cli:begin {name} --> ... end" for name in known
                    if name not in seen)
    return updated, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block is stale or missing")
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="the reference to refresh (default: docs/cli.md)")
    args = parser.parse_args(argv)
    document = args.doc.read_text(encoding="utf-8")
    updated, problems = refresh(document)
    missing_or_unknown = [p for p in problems if not p.endswith("is stale")]
    if args.check:
        for problem in problems:
            print(f"{args.doc}: {problem}", file=sys.stderr)
        if problems:
            print("what to do: run `.venv/bin/python scripts/cli_reference.py` and commit docs/cli.md", file=sys.stderr)
        return 1 if problems else 0
    if updated != document:
        write_text_atomic(args.doc, updated)
        print(f"updated {args.doc}")
    for problem in missing_or_unknown:
        print(f"{args.doc}: {problem}", file=sys.stderr)
    return 1 if missing_or_unknown else 0


if __name__ == "__main__":
    sys.exit(main())
