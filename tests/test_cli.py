"""The CLI skeleton: --help, --version, doctor, and how user errors are shown."""

from __future__ import annotations

import json
import subprocess
import sys

from ortft import __version__
from ortft.cli import COMMAND_MODULES


def run_ortft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ortft", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    result = run_ortft("--help")
    assert result.returncode == 0
    for name in COMMAND_MODULES:
        assert f"  {name} " in result.stdout, name


def test_version():
    result = run_ortft("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_doctor_reports_versions_and_providers():
    result = run_ortft("doctor", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["onnxruntime"].startswith("onnxruntime 1.")  # stock onnxruntime, never the training build
    assert facts["onnx"].startswith("1.16")
    assert "CPUExecutionProvider" in facts["execution_providers"]
    assert facts["training"].startswith("ok")
    assert facts["auto_provider"] == "cpu"
    assert facts["prepare_extra"] == "installed"
    assert facts["training_threads"] >= 1
    text = run_ortft("doctor").stdout
    assert "numpy" in text and "tokenizers" in text and "cpu_count" in text


def test_user_error_exits_2_with_message_and_no_traceback(tmp_path):
    result = run_ortft("info", str(tmp_path / "no-such-bundle"))
    assert result.returncode == 2
    assert result.stderr.startswith("error:")
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_option_is_a_usage_error():
    result = run_ortft("info", "--no-such-flag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_bug_keeps_its_traceback(monkeypatch):
    from ortft import cli

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli.cli, "main", broken)
    try:
        cli.main(["doctor"])
    except RuntimeError as exc:
        assert "a bug" in str(exc)
    else:
        raise AssertionError("a bug must propagate with its traceback")
