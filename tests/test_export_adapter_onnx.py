"""Tests of `ortft export --format onnx-adapter` and `ortft generate DIR --adapter NAME`: the base graph with the
adapters as inputs computes what the merged export computes, more runs add only their adapter files (atomically,
concurrently), onnxruntime-genai serves several adapters from one folder (its own venv), errors are clean."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
from helpers.runtime_venvs import run_genai
from helpers.bundles import build_bundle
from helpers.reference import onnx_adapter_logits, onnx_logits, torch_logits
from helpers.runs import make_run

from ortft.config import SamplingSettings
from ortft.errors import BundleError, ConfigError, OutputExistsError
from ortft.export import export_merged_onnx, export_run
from ortft.export_adapter_onnx import adapter_slots, export_onnx_adapter
from ortft.fsutil import sha256_file
from ortft.generate import Generator

PROMPTS = [[1, 17, 42, 99], [5, 6, 7], [3, 200, 100, 50]]
GREEDY = SamplingSettings(max_new_tokens=10, temperature=0)


def _input_ids(shape=(2, 10), seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 320, size=shape).astype(np.int64)


def _other_adapter(bundle, seed: int) -> dict:
    """A second trained adapter for the same bundle (different B values)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.normal(size=value.shape).astype(np.float32) * 0.2 if ".lora_B." in name else value)
            for name, value in bundle.adapter.items()}


def _greedy(folder, adapter=None) -> list[list[int]]:
    generator = Generator(folder, threads=1, adapter=adapter)
    return [generator.generate_ids(prompt, GREEDY) for prompt in PROMPTS]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-adapter")
    bundle = build_bundle(root / "bundle", "llama", seed=6)
    second = dataclasses.replace(bundle, adapter=_other_adapter(bundle, 1))
    runs = {"first": make_run(root / "first", bundle), "second": make_run(root / "second", second)}
    merged = {}
    for name, tiny in (("first", bundle), ("second", second)):
        merged[name] = root / f"merged-{name}"
        export_merged_onnx(tiny.bundle_dir, tiny.manifest, tiny.adapter, merged[name])
    folder = root / "served"
    export_run(runs["first"], folder, kind="onnx-adapter")
    return {"bundle": bundle, "second": second, "runs": runs, "merged": merged, "folder": folder, "root": root}


@pytest.mark.parametrize("kind", ["lora", "dora", "phi3", "qwen2-partial"])
def test_adapter_inputs_give_the_merged_logits(kind, lora, tmp_path):
    if kind == "lora":
        bundle = lora["bundle"]
    elif kind == "dora":
        bundle = build_bundle(tmp_path / "bundle", "llama", dora=True, rank=8, alpha=16.0)
    elif kind == "phi3":
        bundle = build_bundle(tmp_path / "bundle", "phi3", dora=True)
    else:
        bundle = build_bundle(tmp_path / "bundle", "qwen2", targets=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "served"
    export_onnx_adapter(bundle.bundle_dir, bundle.manifest, bundle.adapter, out, "tuned")
    input_ids = _input_ids()
    expected = torch_logits(bundle.peft_model, input_ids)
    np.testing.assert_allclose(onnx_adapter_logits(out, "tuned", input_ids), expected, atol=1e-4, rtol=0)
    # without an adapter the graph is the base model
    base = torch_logits(bundle.base_model, input_ids)
    assert np.abs(expected - base).max() > 1e-2
    np.testing.assert_allclose(onnx_logits(out / "model.onnx", input_ids), base, atol=1e-4, rtol=0)


def test_folder_contents_and_manifest(lora):
    folder, bundle = lora["folder"], lora["bundle"]
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == {
        "model.onnx", "model.onnx.data", "config.json", "generation_config.json", "genai_config.json", "manifest.json",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "adapters/first.onnx_adapter"}
    written = json.loads((folder / "manifest.json").read_text())
    assert written["kind"] == "onnx-adapter" and set(written["adapters"]) == {"first"}
    assert written["adapters"]["first"]["file"] == "adapters/first.onnx_adapter"
    assert written["adapters"]["first"]["run"] == lora["runs"]["first"].name  # a name, never a host path (issue 21)
    assert len(written["adapter_inputs"]) == len(adapter_slots(bundle.manifest)) == 14
    q_proj = written["adapter_inputs"][0]
    assert q_proj["module"] == "model.layers.0.self_attn.q_proj"
    assert [(i["name"], i["shape"], i["default"]) for i in q_proj["inputs"]] == [
        ("model.layers.0.self_attn.q_proj.lora_A", [64, 4], 0.0), ("model.layers.0.self_attn.q_proj.lora_B", [4, 64], 0.0)]


def test_generate_with_each_adapter_equals_its_merged_export(lora, tmp_path):
    folder = tmp_path / "served"
    export_run(lora["runs"]["first"], folder, kind="onnx-adapter", adapter_name="first")
    export_run(lora["runs"]["second"], folder, kind="onnx-adapter", adapter_name="second")
    for name in ("first", "second"):
        assert _greedy(folder, name) == _greedy(lora["merged"][name])
    assert _greedy(lora["merged"]["first"]) != _greedy(lora["merged"]["second"])
    assert _greedy(folder) == _greedy(lora["bundle"].bundle_dir)  # no adapter: the bundle's base model


def test_another_run_adds_only_its_adapter_file(lora, tmp_path):
    folder = tmp_path / "served"
    export_run(lora["runs"]["first"], folder, kind="onnx-adapter")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"}
    result = export_run(lora["runs"]["second"], folder, kind="onnx-adapter")
    assert result["added_adapter"] == "second" and set(result["adapters"]) == {"first", "second"}
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert after == before  # the base model, tokenizer and configs were not rewritten
    written = json.loads((folder / "manifest.json").read_text())
    assert set(written["adapters"]) == {"first", "second"}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(written["files"]) == on_disk
    assert written["files"]["adapters/second.onnx_adapter"]["sha256"] == sha256_file(folder / "adapters" / "second.onnx_adapter")
    # the same name again is refused; --force replaces that adapter only
    with pytest.raises(OutputExistsError, match="already has an adapter named second"):
        export_run(lora["runs"]["first"], folder, kind="onnx-adapter", adapter_name="second")
    export_run(lora["runs"]["first"], folder, kind="onnx-adapter", adapter_name="second", force=True)
    assert _greedy(folder, "second") == _greedy(lora["merged"]["first"])
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"} == before


def test_concurrent_exports_into_one_folder_keep_every_adapter(lora, tmp_path):
    folder = tmp_path / "served"
    export_run(lora["runs"]["first"], folder, kind="onnx-adapter")
    errors = []

    def add(name):
        try:
            export_run(lora["runs"]["second"], folder, kind="onnx-adapter", adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(f"copy{index}",)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    written = json.loads((folder / "manifest.json").read_text())
    assert set(written["adapters"]) == {"first", "copy0", "copy1", "copy2", "copy3"}
    assert not [p for p in folder.rglob(".ortft-tmp-*")]


def test_a_failed_adapter_write_leaves_the_folder_as_it_was(lora, tmp_path, monkeypatch):
    import onnxruntime as ort

    folder = tmp_path / "served"
    export_run(lora["runs"]["first"], folder, kind="onnx-adapter")
    manifest_before = (folder / "manifest.json").read_bytes()

    class FailingFormat(ort.AdapterFormat):
        def export_adapter(self, path):
            with open(path, "wb") as handle:
                handle.write(b"half an adapter")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(ort, "AdapterFormat", FailingFormat)
    from ortft.errors import DiskWriteError

    with pytest.raises(DiskWriteError, match="disk is full"):
        export_run(lora["runs"]["second"], folder, kind="onnx-adapter")
    assert (folder / "manifest.json").read_bytes() == manifest_before
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == ["first.onnx_adapter"]


def test_user_errors(lora, tmp_path):
    folder = lora["folder"]
    with pytest.raises(ConfigError, match="no adapter of that name .*it has: first"):
        Generator(folder, adapter="missing")
    with pytest.raises(ConfigError, match="merged export"):
        Generator(lora["merged"]["first"], adapter="first")
    with pytest.raises(ConfigError, match="not a plain file name"):
        export_run(lora["runs"]["first"], tmp_path / "x", kind="onnx-adapter", adapter_name="../evil")
    with pytest.raises(ConfigError, match="--adapter-name applies to --format onnx-adapter only"):
        export_run(lora["runs"]["first"], tmp_path / "x", adapter_name="a")
    # a folder holding another bundle's base (or anything else) is not added to
    other = build_bundle(tmp_path / "other", "llama", seed=9)
    other_run = make_run(tmp_path / "other-run", other)
    with pytest.raises(OutputExistsError, match="another bundle"):
        export_run(other_run, folder, kind="onnx-adapter")
    (tmp_path / "plain").mkdir()
    with pytest.raises(OutputExistsError, match="something else"):
        export_run(other_run, tmp_path / "plain", kind="onnx-adapter")
    assert not (tmp_path / "x").exists()


def test_whole_module_training_is_refused():
    manifest = {"trainable": [{"name": "score.weight", "role": "full", "base_weight": None, "shape": [2, 64]}]}
    with pytest.raises(BundleError, match="trains whole modules"):
        adapter_slots(manifest)


def _cli(args: list[str]) -> int:
    from ortft.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_cli_export_and_generate_with_adapter(lora, tmp_path, capsys):
    folder = tmp_path / "served"
    for run in ("first", "second"):
        assert _cli(["export", str(lora["runs"][run]), "--out", str(folder), "--format", "onnx-adapter"]) == 0
    assert "added adapter second to" in capsys.readouterr().err
    assert _cli(["generate", str(folder), "--adapter", "second", "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    assert _cli(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert "serving the base model; this folder's adapters: first, second" in capsys.readouterr().err
    assert _cli(["generate", str(folder), "--adapter", "third", "--prompt", "hello"]) == 2
    assert "it has: first, second" in capsys.readouterr().err


def test_genai_serves_several_adapters_from_one_folder(lora, tmp_path):
    folder = tmp_path / "served"
    export_run(lora["runs"]["first"], folder, kind="onnx-adapter")
    export_run(lora["runs"]["second"], folder, kind="onnx-adapter")
    adapters = {name: str(folder / "adapters" / f"{name}.onnx_adapter") for name in ("first", "second")}
    answer = run_genai({"folder": str(folder), "prompts": PROMPTS, "max_new_tokens": GREEDY.max_new_tokens,
                        "adapters": adapters, "runs": ["first", "second", None]}, tmp_path)
    assert answer["generated"]["first"] == _greedy(lora["merged"]["first"])
    assert answer["generated"]["second"] == _greedy(lora["merged"]["second"])
    assert answer["generated"]["None"] == _greedy(folder)
