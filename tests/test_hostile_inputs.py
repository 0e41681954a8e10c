"""Hostile inputs (issue 21): one test per finding, each repeating the attack on a tiny bundle, run, adapter,
data file or template and asserting the clean refusal: exit 2, the file named, nothing written or copied.

The attacker writes the manifest too (tests/hostile.py `reseal`), so only ortft's loader gate
(ortft/trust.py) and its checks of values can tell. Federated replies: tests/federated/test_hostile_replies.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hostile import (
    copy_bundle,
    edit_manifest,
    inference_graph,
    location_of,
    files_under,
    holds_secret,
    make_run,
    point_external_data,
    refused,
    reseal,
    succeeds,
    write_secret,
)
from train_helpers import tiny_bundle, write_text_data


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_llama) -> Path:
    """The tiny llama bundle (training graphs, inference template, tokenizer), never modified."""
    return tiny_bundle(tmp_path_factory, tiny_llama, "llama-hostile")


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    return copy_bundle(pristine, tmp_path / "bundle")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_text_data(tmp_path_factory.mktemp("hostile-data") / "train.jsonl", 8)


def _train_args(bundle: Path, data: Path, out: Path, *extra) -> list:
    return ["train", bundle, "--data", data, "--out", out, "--steps", "1", "--seq-len", "32", "--batch-size", "2",
            "--threads", "1", "--eval-every", "100", *extra]


# ---- High: ONNX external data ------------------------------------------------------------------------


def test_external_data_outside_the_bundle_is_refused_by_every_command(bundle, data, tmp_path, capsys):
    """The inference template reads `../secret/id_rsa` (hashes recomputed): validate, train, info, export and
    generate refuse it, naming the graph; nothing is exported or generated, the secret is copied nowhere."""
    secret = write_secret(tmp_path)
    graph = inference_graph(bundle)
    name = point_external_data(graph, location_of(secret, graph))
    reseal(bundle)
    graph_name = graph.relative_to(bundle).as_posix()
    for argv in (["validate", bundle, "--no-train-step"], ["info", bundle], _train_args(bundle, data, tmp_path / "run"),
                 ["generate", bundle, "--prompt", "hi", "--max-new-tokens", "2"]):
        refused(argv, capsys, graph_name, name, "not a file inside the folder")
    assert not (tmp_path / "run").exists()
    run = make_run(tmp_path / "made-run", bundle)
    refused(["export", run, "--out", tmp_path / "export"], capsys, graph_name)
    assert not (tmp_path / "export").exists() and not holds_secret(tmp_path / "made-run")


def test_training_graphs_reading_an_absolute_path_are_refused(bundle, data, tmp_path, capsys):
    """training_model.onnx and eval_model.onnx read a frozen weight from an absolute path outside the bundle (a
    copy of the real data, so ORT would train): validate and train refuse, no run folder is made."""
    outside = tmp_path / "elsewhere" / "frozen_weights.data"
    outside.parent.mkdir()
    shutil.copyfile(bundle / "frozen_weights.data", outside)
    for graph in ("training_model.onnx", "eval_model.onnx"):
        point_external_data(bundle / graph, str(outside), max_bytes=outside.stat().st_size)
    reseal(bundle)
    refused(["validate", bundle], capsys, "training_model.onnx", "not a file inside the folder")
    refused(_train_args(bundle, data, tmp_path / "run"), capsys, "training_model.onnx")
    assert not (tmp_path / "run").exists()


def test_external_data_beyond_its_file_or_unlisted_is_refused(bundle, tmp_path, capsys):
    """A location inside the bundle that the manifest does not list, and an offset past the end of a listed file."""
    import onnx

    graph = inference_graph(bundle)
    (graph.parent / "extra.data").write_bytes(b"\0" * 4096)
    point_external_data(graph, "extra.data")
    reseal(bundle)
    refused(["validate", bundle, "--no-train-step"], capsys, "extra.data", "does not list")
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                  and dict((e.key, e.value) for e in t.external_data)["location"] != "extra.data")
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(10**9)
    graph.write_bytes(model.SerializeToString())
    reseal(bundle)
    refused(["validate", bundle, "--no-train-step"], capsys, graph.relative_to(bundle).as_posix(), ", which has")


# ---- High: symbolic links and unlisted files ----------------------------------------------------------


def test_symlinks_and_unlisted_files_are_never_followed_or_copied(bundle, tmp_path, capsys):
    """`tokenizer -> ~/.ssh`-style link: every command refuses it by name. An unlisted tokenizer/notes.txt
    linking to the secret is never copied into an export; a listed file that is a link is refused."""
    secret = write_secret(tmp_path)
    fake_ssh = secret.parent
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copyfile(bundle / "tokenizer" / name, fake_ssh / name)
    shutil.rmtree(bundle / "tokenizer")
    os.symlink(fake_ssh, bundle / "tokenizer")
    reseal(bundle)
    run = make_run(tmp_path / "run", bundle)
    for argv in (["validate", bundle, "--no-train-step"], ["info", bundle], ["export", run, "--out", tmp_path / "export"],
                 ["generate", bundle, "--prompt", "hi", "--max-new-tokens", "2"]):
        refused(argv, capsys, "tokenizer", "symbolic link")
    assert not (tmp_path / "export").exists()

    os.unlink(bundle / "tokenizer")
    shutil.copytree(fake_ssh, bundle / "tokenizer", ignore=shutil.ignore_patterns("id_rsa"))
    os.symlink(secret, bundle / "tokenizer" / "notes.txt")  # unlisted: export must not copy it
    reseal(bundle)
    run = make_run(tmp_path / "run2", bundle)
    succeeds(["export", run, "--out", tmp_path / "export"], capsys)
    assert "notes.txt" not in files_under(tmp_path / "export") and not holds_secret(tmp_path / "export")
    written = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert "notes.txt" not in written["files"]

    reseal(bundle, add=("tokenizer/notes.txt",))  # now listed, but a link: refused
    refused(["export", make_run(tmp_path / "run3", bundle), "--out", tmp_path / "export2"], capsys, "tokenizer/notes.txt",
            "symbolic link")
    assert not (tmp_path / "export2").exists()
