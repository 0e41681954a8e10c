"""scripts/cli_reference.py keeps docs/cli.md's `--help` blocks equal to the commands' help.

The first test is the one that matters day to day: it fails as soon as an option or help text changes
without `scripts/cli_reference.py` being run. The others check that the script notices what it promises to.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cli_reference.py"


@pytest.fixture(scope="module")
def cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_cli_md_is_current():
    completed = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True,
                               text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr


def test_every_command_and_subcommand_is_listed(cli_reference):
    names = cli_reference.command_names()
    assert {"prepare", "train", "eval", "export", "generate", "predict", "federate", "federate local"} <= set(names)
    assert len(names) == len(set(names))


def test_help_text_has_a_fixed_width_and_the_short_help_option(cli_reference):
    text = cli_reference.help_text("federate local")
    assert text.startswith("Usage: ortft federate local [OPTIONS] BUNDLE")
    assert "-h, --help" in text
    assert max(len(line) for line in text.splitlines()) <= cli_reference.HELP_WIDTH


def test_stale_missing_and_unknown_blocks_are_reported(cli_reference, tmp_path):
    doc = tmp_path / "cli.md"
    doc.write_text("# ref\n<!-- ortft-cli:begin train -->\nold help\n<!-- ortft-cli:end train -->\n"
                   "<!-- ortft-cli:begin frobnicate -->\n<!-- ortft-cli:end frobnicate -->\n")
    assert cli_reference.main(["--check", "--doc", str(doc)]) == 1
    _, problems = cli_reference.refresh(doc.read_text())
    assert "the block of `ortft train` is stale" in problems
    assert any("frobnicate" in problem and "no command" in problem for problem in problems)
    assert any(problem.startswith("no block for `ortft eval`") for problem in problems)
    # Without --check the stale block is rewritten; the unknown and missing ones still fail the run.
    assert cli_reference.main(["--doc", str(doc)]) == 1
    assert cli_reference.render_block("train") in doc.read_text()
    assert "old help" not in doc.read_text()


def test_the_readme_command_table_names_every_command(cli_reference):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Commands"):]
    missing = [name for name in cli_reference.command_names() if f"| `ortft {name}" not in table]
    assert not missing, f"README.md's command table lacks {missing}"
