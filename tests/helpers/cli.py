"""Running the `ortft` command in a subprocess, as a user does, and checking how it ended."""

from __future__ import annotations

import os
import subprocess
import sys

from .paths import ROOT

# Small, fast, deterministic settings for the tiny bundles (threads=1 makes ORT bit-reproducible).
FAST = ("--seq-len", "64", "--batch-size", "2", "--threads", "1")

# The head of a `python -c` script that makes the host packages unimportable (the device has none), then
# imports ortft's CLI as `main`.
BLOCK_HOST_PACKAGES = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'optimum'):
            raise ImportError('blocked on the device: ' + name)
sys.meta_path.insert(0, Block())
from ortft.cli import main
"""


def ortft_command(*args) -> list[str]:
    return [sys.executable, "-m", "ortft", *map(str, args)]


def run_ortft(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(ortft_command(*args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    return result


def user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert exit code 2, one clear message and no traceback; return stderr."""
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr
