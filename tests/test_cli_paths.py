"""A path the user names that is missing (or a file where a folder belongs) is ortft's `error:` / `what to do:`,
exit code 2, never click's "Error: Invalid value"."""

from __future__ import annotations

import click
import pytest

from ortft.cli import main
from ortft.cli_paths import InputPath
from ortft.errors import InputNotFoundError


def run_main(capsys, *argv) -> tuple[int, str]:
    """ortft's entry point in-process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return exit_info.value.code, capsys.readouterr().err


def assert_ortft_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    assert stderr.startswith("error: "), stderr
    assert "\n  what to do: " in stderr, stderr
    assert "Invalid value" not in stderr and "Usage:" not in stderr and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)


def test_input_path_names_the_option_and_gives_the_hint(tmp_path):
    @click.command()
    @click.option("--data", type=InputPath("pass a JSONL file", dir_okay=False))
    @click.argument("folder", type=InputPath("pass a folder", file_okay=False))
    def command(data, folder):
        click.echo(f"{data} {folder}")

    existing = tmp_path / "data.jsonl"
    existing.write_text("{}\n")
    assert command.main([str(tmp_path), "--data", str(existing)], standalone_mode=False) is None
    cases = [
        ([str(tmp_path / "nowhere")], "nowhere does not exist", "pass a folder"),
        ([str(existing)], "data.jsonl is a file, not a folder", "pass a folder"),
        ([str(tmp_path), "--data", str(tmp_path / "missing.jsonl")], "--data " + str(tmp_path / "missing.jsonl") + " does not exist",
         "pass a JSONL file"),
        ([str(tmp_path), "--data", str(tmp_path)], f"--data {tmp_path} is a folder, not a file", "pass a JSONL file"),
    ]
    for argv, message, hint in cases:
        with pytest.raises(InputNotFoundError) as caught:
            command.main(argv, standalone_mode=False)
        assert message in caught.value.message and caught.value.hint == hint


def test_an_output_path_may_be_missing_but_not_a_folder(tmp_path):
    @click.command()
    @click.option("--out", type=InputPath("name a file to write", exists=False, dir_okay=False))
    def command(out):
        click.echo(out)

    assert command.main(["--out", str(tmp_path / "new.png")], standalone_mode=False) is None
    with pytest.raises(InputNotFoundError, match="is a folder, not a file"):
        command.main(["--out", str(tmp_path)], standalone_mode=False)


def test_train_with_missing_data_or_bundle(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert_ortft_error(*run_main(capsys, "train", tmp_path, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "run"),
                       "--data", "missing.jsonl does not exist", "JSONL file of training examples")
    assert_ortft_error(*run_main(capsys, "train", tmp_path / "no-bundle", "--data", data, "--out", tmp_path / "run"),
                       "no-bundle does not exist", "ortft prepare")
    assert_ortft_error(*run_main(capsys, "train", tmp_path, "--data", data, "--out", tmp_path / "run",
                                 "--init-adapter", tmp_path / "adapter.safetensors"), "--init-adapter", "does not exist")
    assert not (tmp_path / "run").exists()


def test_eval_export_generate_predict_with_missing_paths(tmp_path, capsys):
    data = tmp_path / "valid.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert_ortft_error(*run_main(capsys, "eval", tmp_path / "no-bundle", "--data", data), "no-bundle does not exist")
    assert_ortft_error(*run_main(capsys, "eval", tmp_path, "--data", tmp_path / "missing.jsonl"),
                       "--data", "missing.jsonl does not exist")
    assert_ortft_error(*run_main(capsys, "export", tmp_path / "no-run", "--out", tmp_path / "export"),
                       "no-run does not exist", "ortft train --out")
    assert_ortft_error(*run_main(capsys, "export", data, "--out", tmp_path / "export"), "is a file, not a folder")
    assert_ortft_error(*run_main(capsys, "generate", tmp_path / "no-export", "--prompt", "hi"),
                       "no-export does not exist", "ortft export --out")
    assert_ortft_error(*run_main(capsys, "predict", tmp_path / "no-run", "--data", data), "no-run does not exist")
    assert_ortft_error(*run_main(capsys, "predict", tmp_path, "--data", tmp_path), "--data", "is a folder, not a file")
    assert_ortft_error(*run_main(capsys, "report", tmp_path, "--out", tmp_path), "--out", "is a folder, not a file")
    assert not (tmp_path / "export").exists()
