"""`ortft.tokenizer_facts`: validate's tokenizer checks and the note for GGUF bundles prepared before issue 19's fix.

Tokenizer folders are made the way `prepare` makes them, from a tiny GGUF written in a fixture
(tests/helpers/tiny_gguf.py): with ortft's GGUF tokenizer (a fixed bundle) and with transformers' own
conversion (what bundles prepared before the fix hold).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from helpers.tiny_gguf import write_tiny_gguf

from ortft.tokenizer_facts import (
    ROUND_TRIP_CHECK,
    SPECIAL_TOKENS_CHECK,
    made_before_gguf_facts,
    prepare_command,
    tokenizer_checks,
    tokenizer_notes,
)

RECORDED = "/home/me/.venv/bin/ortft prepare /models/tiny.gguf --out /bundles/tiny --rank 4"


@pytest.fixture(scope="module")
def gguf_path(tiny_llama, tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_llama)


def _bundle(folder: Path, gguf_path: Path, fixed: bool) -> tuple[Path, dict]:
    """A bundle's tokenizer folder and manifest (the parts these checks read), as prepare writes them."""
    from transformers import AutoTokenizer

    from ortft.prepare import source as sources
    from ortft.prepare.gguf_tokenizer import tokenizer_source_facts
    from ortft.prepare.pipeline import _save_tokenizer

    source = sources.resolve_source(str(gguf_path), None)
    if fixed:
        tokenizer = sources.load_tokenizer(source)
    else:  # what transformers' converter gives, as bundles prepared before the fix hold it
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    section = _save_tokenizer(tokenizer, folder / "tokenizer")
    if fixed:
        section["source_facts"] = tokenizer_source_facts(source, tokenizer)
    manifest = {
        "format": "ortft-bundle",
        "task": "causal-lm",
        "source": {"path": str(gguf_path.parent), "gguf_file": gguf_path.name},
        "model": {"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 2},
        "tokenizer": section,
        "prepare": {"command": RECORDED, "config": {"model": "/models/tiny.gguf"}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder, manifest


@pytest.fixture(scope="module")
def fixed(gguf_path, tmp_path_factory):
    return _bundle(tmp_path_factory.mktemp("fixed"), gguf_path, fixed=True)


@pytest.fixture(scope="module")
def old(gguf_path, tmp_path_factory):
    return _bundle(tmp_path_factory.mktemp("old"), gguf_path, fixed=False)


def _by_name(checks) -> dict:
    return {name: (ok, detail) for name, ok, detail in checks}


def test_a_fixed_gguf_bundle_passes(fixed):
    folder, manifest = fixed
    checks = _by_name(tokenizer_checks(folder, manifest))
    assert checks[SPECIAL_TOKENS_CHECK][0], checks
    assert "eos 2 '<|im_end|>'" in checks[SPECIAL_TOKENS_CHECK][1] and "not added" in checks[SPECIAL_TOKENS_CHECK][1]
    assert checks[ROUND_TRIP_CHECK][0], checks
    assert tokenizer_notes(folder, manifest) == []
    assert not made_before_gguf_facts(folder, manifest)


def test_an_old_gguf_bundle_fails_with_the_command_that_fixes_it(old, gguf_path):
    folder, manifest = old
    ok, detail = _by_name(tokenizer_checks(folder, manifest))[SPECIAL_TOKENS_CHECK]
    assert not ok
    assert "'<|im_start|>'" in detail and "adds it as BOS" in detail
    notes = tokenizer_notes(folder)  # reads the manifest itself
    assert len(notes) == 1 and "\n" not in notes[0]
    # the recorded command, with the model's absolute path and the bundle's present folder
    assert notes[0].endswith(f"`ortft prepare {gguf_path} --out {folder} --rank 4 --force`")


def test_source_facts_that_disagree_with_the_tokenizer_fail(fixed):
    folder, manifest = fixed
    changed = copy.deepcopy(manifest)
    changed["tokenizer"]["source_facts"]["eos_token_id"] = 0
    ok, detail = _by_name(tokenizer_checks(folder, changed))[SPECIAL_TOKENS_CHECK]
    assert not ok and "eos_token_id 2 but the source says 0" in detail
    changed = copy.deepcopy(manifest)
    changed["tokenizer"]["source_facts"]["add_bos_token"] = True
    assert not _by_name(tokenizer_checks(folder, changed))[SPECIAL_TOKENS_CHECK][0]
    changed = copy.deepcopy(manifest)
    changed["model"]["eos_token_ids"] = [0]
    ok, detail = _by_name(tokenizer_checks(folder, changed))[SPECIAL_TOKENS_CHECK]
    assert not ok and "lack the GGUF's eos 2" in detail


def test_a_hugging_face_bundle_without_source_facts_passes(fixed):
    folder, manifest = fixed
    hf = copy.deepcopy(manifest)
    hf["source"] = {"path": "/models/hf", "gguf_file": None}
    del hf["tokenizer"]["source_facts"]
    checks = _by_name(tokenizer_checks(folder, hf))
    assert checks[SPECIAL_TOKENS_CHECK][0] and "Hugging Face" in checks[SPECIAL_TOKENS_CHECK][1]
    assert tokenizer_notes(folder, hf) == []


def test_round_trip_failure_is_reported(fixed, tmp_path):
    """A lossy tokenizer (here: a lowercasing normalizer) fails the round trip; seq-cls bundles skip it."""
    folder, manifest = fixed
    lossy = tmp_path / "lossy"
    shutil.copytree(folder / "tokenizer", lossy / "tokenizer")
    state = json.loads((lossy / "tokenizer" / "tokenizer.json").read_text())
    state["normalizer"] = {"type": "Lowercase"}
    (lossy / "tokenizer" / "tokenizer.json").write_text(json.dumps(state))
    ok, detail = _by_name(tokenizer_checks(lossy, manifest))[ROUND_TRIP_CHECK]
    assert not ok and "decodes to 'hello, world!" in detail
    classifier = dict(manifest, task="seq-cls")
    assert ROUND_TRIP_CHECK not in _by_name(tokenizer_checks(lossy, classifier))


def test_a_missing_tokenizer_is_a_failed_check(tmp_path, fixed):
    _folder, manifest = fixed
    checks = tokenizer_checks(tmp_path, manifest)
    assert checks[0][0] == "tokenizer loads" and not checks[0][1] and "tokenizer.json" in checks[0][2]


def test_exports_of_old_bundles_get_the_note(old, tmp_path):
    folder, manifest = old
    export = {"format": "ortft-export", "kind": "merged-onnx", "tokenizer": manifest["tokenizer"],
              "model": manifest["model"], "source": {"bundle": str(folder)}}
    notes = tokenizer_notes(tmp_path, export)
    assert len(notes) == 1 and "then train and export again" in notes[0] and "--force" in notes[0]
    # The bundle is not on this device: the converter's mark (bos == eos, added to every text) still tells.
    export["source"] = {"bundle": str(tmp_path / "gone")}
    assert made_before_gguf_facts(tmp_path, export)
    assert "ortft prepare MODEL.gguf --out BUNDLE --force" in tokenizer_notes(tmp_path, export)[0]
    gpt2_like = copy.deepcopy(export)
    gpt2_like["tokenizer"].update(bos_token="<|endoftext|>", eos_token="<|endoftext|>", add_bos_token=False)
    assert not made_before_gguf_facts(tmp_path, gpt2_like)


def test_prepare_command_without_a_recorded_ortft_command(old):
    folder, manifest = old
    other = copy.deepcopy(manifest)
    gguf = Path(other["source"]["path"]) / "tiny.gguf"
    other["prepare"]["command"] = "/usr/bin/pytest tests"
    assert prepare_command(folder, other) == f"ortft prepare {gguf} --out {folder} --force"
    other["prepare"]["command"] = "python -m ortft prepare x --out y"
    assert prepare_command(folder, other) == f"ortft prepare {gguf} --out {folder} --force"
    other["prepare"] = {"command": "/x/ortft/__main__.py prepare models --out=b --dora --force", "config": {"model": "models"}}
    assert prepare_command(folder, other) == f"ortft prepare {gguf.parent} --out={folder} --dora --force"


def test_generate_prints_the_note_for_an_old_gguf_bundle(tmp_path, capsys):
    """`ortft generate BUNDLE` (the bundle's base model) says how to fix a bundle prepared before the fix."""
    from helpers.bundles import build_bundle

    from ortft.cli import main

    bundle = build_bundle(tmp_path / "bundle", "llama", seed=1).bundle_dir
    main(["generate", str(bundle), "--prompt", "hello", "--max-new-tokens", "2", "--threads", "1"])
    assert "note:" not in capsys.readouterr().err  # a Hugging Face bundle: nothing to say
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["source"]["gguf_file"] = "tiny.gguf"
    manifest["prepare"] = {"command": RECORDED}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    main(["generate", str(bundle), "--prompt", "hello", "--max-new-tokens", "2", "--threads", "1"])
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "--force`" in err


def test_train_prints_the_note_for_an_old_gguf_bundle_only(gguf_path, tmp_path):
    """A real (tiny) bundle prepared from a GGUF trains without a note; with its source facts removed, as a
    bundle prepared before the fix has none, `train` prints the note and the command (and still trains)."""
    from helpers.bundles import prepare_tiny
    from helpers.cli import FAST, ok, run_ortft
    from helpers.data import write_text_data

    bundle = tmp_path / "bundle"
    prepare_tiny(gguf_path, bundle)
    data = write_text_data(tmp_path / "train.jsonl", 8)
    command = ("train", bundle, "--data", data, *FAST, "--steps", "1", "--eval-every", "100", "--save-every", "100")
    result = ok(run_ortft(*command, "--out", tmp_path / "run-new"))
    assert "ortft prepare" not in result.stderr
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
    del manifest["tokenizer"]["source_facts"]
    (old / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = ok(run_ortft(*command[:1], old, *command[2:], "--out", tmp_path / "run-old"))
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ") and "GGUF" in line]
    assert len(notes) == 1 and "ortft prepare" in notes[0] and "--force`" in notes[0]
