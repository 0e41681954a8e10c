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
    assert result.stderr == "error: No such option '--no-such-flag'\n  what to do: see `ortft info --help`\n"


def test_usage_errors_are_said_the_ortft_way(capsys):
    from ortft.cli import main

    cases = [
        (["export", ".", "--out", "x", "--format", "nope"], "error: --format: 'nope' is not one of 'merged-onnx'", "ortft export --help"),
        (["eval", "."], "error: Missing option '--data'", "ortft eval --help"),
        (["generate", ".", "--top-p", "5"], "error: --top-p: 5.0 is not in the range", "ortft generate --help"),
        (["no-such-command"], "error: No such command 'no-such-command'", "ortft --help"),
    ]
    for argv, message, help_command in cases:
        try:
            main(argv)
        except SystemExit as exit_info:
            assert exit_info.code == 2, argv
        else:
            raise AssertionError(f"{argv} must exit 2")
        err = capsys.readouterr().err
        assert err.startswith(message), (argv, err)
        assert f"  what to do: see `{help_command}`" in err and "Usage:" not in err and "Invalid value" not in err, err


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


def _leaf_commands():
    """(name, click.Command) of every command and subcommand, loaded the way `ortft --help` loads them."""
    import click

    from ortft.cli import cli

    context = click.Context(cli)
    found = []

    def walk(command, name):
        if isinstance(command, click.Group):
            for sub in command.list_commands(context):
                walk(command.get_command(context, sub), f"{name} {sub}".strip())
        else:
            found.append((name, command))

    walk(cli, "")
    return found


def test_every_option_of_every_command_has_help_text():
    import click

    commands = _leaf_commands()
    assert {name for name, _ in commands} >= {"train", "eval", "export", "generate", "predict", "prepare", "federate local"}
    undescribed = [f"{name} {param.opts[0]}" for name, command in commands for param in command.params
                   if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert undescribed == []


def test_help_marks_required_options():
    import click

    for name, command in _leaf_commands():
        for param in command.params:
            if isinstance(param, click.Option) and param.required:
                record = param.get_help_record(click.Context(command))
                assert "[required]" in record[1], (name, param.opts)
    train_help = run_ortft("train", "--help").stdout
    for option in ("--data", "--out"):  # required, but a --config file may give them instead
        text = " ".join(train_help.split(option + " ", 1)[1].split("\n  --", 1)[0].split())
        assert "[required, or" in text and "--config]" in text, (option, text)
    assert "[default: 512, or the bundle's max_seq_len if smaller]" in " ".join(train_help.split())
