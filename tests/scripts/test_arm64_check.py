"""scripts/arm64-check.sh's argument handling only (cheap). The check itself (a Debian arm64 root under
qemu, ~20 min on first use) is too slow for every test run: run it by hand (docs/providers.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "arm64-check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_help_says_what_it_checks():
    completed = run("--help")
    assert completed.returncode == 0, completed.stderr
    assert "aarch64" in completed.stdout and "--root-only" in completed.stdout


def test_bad_arguments_are_usage_errors():
    for args in (["--bogus"], ["--steps"], ["--steps", "x"], ["--tol", "abc"]):
        completed = run(*args)
        assert completed.returncode == 2, (args, completed.stderr)
        assert completed.stderr.startswith("error:"), completed.stderr
