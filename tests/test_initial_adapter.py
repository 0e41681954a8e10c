"""The bundle's initial adapter without its zero tensors: prepare leaves them out of the file and lists them in the
manifest, the loader puts exact zeros back; a bundle that stores every tensor (as before) trains and exports the same."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from helpers.bundles import tiny_bundle
from helpers.cli import FAST, ok, run_ortft
from helpers.data import write_text_data
from helpers.runs import read_adapter, train_losses

from ortft.errors import UserError
from ortft.initial_adapter import ZEROS_KEY, initial_parameters, split_zero_tensors
from ortft.manifest import read_manifest, write_manifest
from ortft.adapter import adapter_bytes, load_adapter
from ortft.bundle import INITIAL_ADAPTER
from ortft.runtime import TrainingSession


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_llama):
    return tiny_bundle(tmp_path_factory, tiny_llama, "llama")


def old_layout(bundle, folder):
    """A copy of `bundle` as prepare wrote it before: every tensor in the file, no ZEROS_KEY in the manifest."""
    shutil.copytree(bundle, folder)
    manifest = read_manifest(folder)
    (folder / INITIAL_ADAPTER).write_bytes(adapter_bytes(initial_parameters(folder, manifest)))
    manifest.pop(ZEROS_KEY)
    manifest.pop("files")
    write_manifest(folder, manifest)
    return folder


def test_only_tensors_whose_bits_are_all_zero_are_left_out():
    arrays = {"b": np.zeros((2, 3), np.float32), "a": np.ones(2, np.float32), "neg": np.array([-0.0, 0.0], np.float32),
              "tiny": np.array([0.0, 1e-45], np.float32), "empty": np.zeros(0, np.float32)}
    stored, zeros = split_zero_tensors(arrays)
    assert zeros == ["b"]
    assert list(stored) == ["a", "neg", "tiny", "empty"]  # -0.0 and a denormal are not +0.0; nothing to save on empty


def test_prepare_leaves_the_zero_b_matrices_out_and_the_loader_fills_them_exactly(bundle):
    manifest = read_manifest(bundle)
    roles = {entry["name"]: entry["role"] for entry in manifest["trainable"]}
    shapes = {entry["name"]: entry["shape"] for entry in manifest["trainable"]}
    zeros = manifest[ZEROS_KEY]
    assert zeros and {roles[name] for name in zeros} == {"lora_B"}
    assert len(zeros) == sum(role == "lora_B" for role in roles.values())  # PEFT starts every B at zero
    stored = load_adapter(bundle / INITIAL_ADAPTER)
    assert sorted([*stored, *zeros]) == sorted(roles) and not set(stored) & set(zeros)
    initial = initial_parameters(bundle, manifest)
    assert list(initial) == list(roles)  # the manifest's order
    for name in zeros:
        assert initial[name].dtype == np.float32 and list(initial[name].shape) == shapes[name]
        assert not initial[name].view(np.uint32).any()  # +0.0, bit for bit
    for name, value in stored.items():
        np.testing.assert_array_equal(initial[name], value)
    session = TrainingSession(bundle, threads=1, with_optimizer=False, manifest=manifest)
    for name, value in initial.items():
        np.testing.assert_array_equal(session.parameter(name), value)


def test_a_zero_list_that_does_not_fit_the_bundle_is_refused(bundle, tmp_path):
    manifest = read_manifest(bundle)
    stored_name = next(iter(load_adapter(bundle / INITIAL_ADAPTER)))
    for bad, message in (([*manifest[ZEROS_KEY], "evil"], "'evil', which is not a trainable tensor"),
                         ([*manifest[ZEROS_KEY], stored_name], "is stored although"),
                         ([*manifest[ZEROS_KEY], manifest[ZEROS_KEY][0]], "lists a tensor twice"),
                         (manifest[ZEROS_KEY][1:], f"{manifest[ZEROS_KEY][0]} missing")):
        with pytest.raises(UserError, match=re.escape(message)):
            initial_parameters(bundle, {**manifest, ZEROS_KEY: bad})
    hostile = tmp_path / "hostile"
    shutil.copytree(bundle, hostile)
    edited = {**manifest, ZEROS_KEY: [*manifest[ZEROS_KEY], "evil"]}
    edited.pop("files")
    write_manifest(hostile, edited)
    result = run_ortft("validate", hostile)
    assert result.returncode != 0 and "which is not a trainable tensor" in result.stdout + result.stderr


def test_validate_and_info_report_the_zero_tensors_and_old_bundles_still_load(bundle, tmp_path):
    manifest = read_manifest(bundle)
    count = len(manifest[ZEROS_KEY])
    validated = ok(run_ortft("validate", bundle)).stdout
    assert f"{count} of them zeros the manifest lists" in validated
    assert f"{count} of {len(manifest['trainable'])} trainable tensors start at zero" in ok(run_ortft("info", bundle)).stdout
    assert json.loads(ok(run_ortft("info", bundle, "--json")).stdout)[ZEROS_KEY] == manifest[ZEROS_KEY]
    old = old_layout(bundle, tmp_path / "old")
    assert ZEROS_KEY not in read_manifest(old)
    assert "zeros the manifest lists" not in ok(run_ortft("validate", old)).stdout
    assert "start at zero" not in ok(run_ortft("info", old)).stdout
    new_start = initial_parameters(bundle, manifest)
    old_start = initial_parameters(old, read_manifest(old))
    assert list(new_start) == list(old_start)
    for name in new_start:
        np.testing.assert_array_equal(new_start[name], old_start[name])


def test_train_and_export_are_unchanged_against_a_bundle_that_stores_every_tensor(bundle, tmp_path):
    """prepare -> train -> export: the same losses, adapter and merged weights, bit for bit (threads=1)."""
    data = write_text_data(tmp_path / "train.jsonl", 12)
    old = old_layout(bundle, tmp_path / "old")
    results = {}
    for label, source in (("new", bundle), ("old", old)):
        run = tmp_path / f"run-{label}"
        ok(run_ortft("train", source, "--data", data, "--out", run, "--steps", 3, *FAST))
        export = tmp_path / f"export-{label}"
        ok(run_ortft("export", run, "--out", export))
        results[label] = (train_losses(run), read_adapter(run / "adapter.safetensors"), (export / "model.onnx.data").read_bytes())
    assert results["new"][0] == results["old"][0] and len(results["new"][0]) == 3
    assert results["new"][1].keys() == results["old"][1].keys()
    for name, value in results["new"][1].items():
        np.testing.assert_array_equal(value, results["old"][1][name])
    assert results["new"][2] == results["old"][2]
