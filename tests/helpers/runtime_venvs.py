"""Test helper: the venvs of runtimes that bring their own onnxruntime (onnxruntime-genai) or must be built
(llama-cpp-python), made by their scripts (idempotent), and a way to run a script in one of them.

A venv that cannot be made fails the test that needs it (with the script's output): nothing is skipped.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest

from .paths import ROOT

HERE = Path(__file__).resolve().parent


@functools.cache
def venv_python(script: str, timeout_s: int) -> Path:
    """Run scripts/SCRIPT (which prints the venv's Python on its last line) and return that Python."""
    result = subprocess.run([str(ROOT / "scripts" / script)], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        pytest.fail(f"scripts/{script} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    python = Path(lines[-1])
    return python if python.is_absolute() else ROOT / python


def genai_python() -> Path:
    return venv_python("genai-venv.sh", 900)


def llama_cpp_python() -> Path:
    return venv_python("llama-cpp-venv.sh", 3600)


def run_json(python: Path, script: Path, request: dict, folder: Path, timeout_s: int = 600) -> dict:
    """Run `python script REQUEST.json` and parse the JSON object it prints last."""
    request_path = Path(folder) / f"{script.stem}-request.json"
    request_path.write_text(json.dumps(request), encoding="utf-8")
    result = subprocess.run([str(python), str(script), str(request_path)], capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        pytest.fail(f"{script.name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_genai(request: dict, folder: Path) -> dict:
    return run_json(genai_python(), HERE / "genai_runner.py", request, folder)
