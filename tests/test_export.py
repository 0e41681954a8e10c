"""Tests of `ortft export`: merged ONNX equals PEFT's logits (LoRA, DoRA, Phi-3), PEFT folders load, errors are clean.

Bundles are tiny random models built in fixtures (tests/helpers/bundles.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ortft.errors import OutputExistsError, RunError
from ortft.export import (
    export_adapter,
    export_merged_onnx,
    export_peft,
    export_run,
    merge_weights,
)
from ortft.run import resolve_run_checkpoint
from helpers.bundles import build_bundle
from helpers.cli import BLOCK_HOST_PACKAGES
from helpers.reference import onnx_logits, torch_logits
from helpers.runs import make_run

ROOT = Path(__file__).resolve().parents[1]


def _input_ids(vocab_size: int = 320, shape=(2, 10), seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape).astype(np.int64)


@pytest.fixture(scope="module")
def lora_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("lora") / "bundle", "llama")


@pytest.fixture(scope="module")
def dora_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("dora") / "bundle", "llama", dora=True, rank=8, alpha=16.0)


@pytest.mark.parametrize("kind", ["lora", "dora", "phi3", "rslora-partial"])
def test_merged_onnx_equals_peft_logits(kind, lora_bundle, dora_bundle, tmp_path):
    if kind == "lora":
        bundle = lora_bundle
    elif kind == "dora":
        bundle = dora_bundle
    elif kind == "phi3":
        bundle = build_bundle(tmp_path / "bundle", "phi3", dora=True)
    else:
        bundle = build_bundle(tmp_path / "bundle", "qwen2", targets=["q_proj", "v_proj", "down_proj"])
    export_merged_onnx(bundle.bundle_dir, bundle.manifest, bundle.adapter, tmp_path / "export")
    input_ids = _input_ids()
    merged = onnx_logits(tmp_path / "export" / "model.onnx", input_ids)
    expected = torch_logits(bundle.peft_model, input_ids)
    assert np.abs(expected - torch_logits(bundle.base_model, input_ids)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(merged, expected, atol=1e-4, rtol=0)


def test_export_folder_contents(lora_bundle, tmp_path):
    out = tmp_path / "export"
    export_manifest = export_merged_onnx(lora_bundle.bundle_dir, lora_bundle.manifest, lora_bundle.adapter, out)
    assert {p.name for p in out.iterdir()} == {
        "model.onnx", "model.onnx.data", "config.json", "generation_config.json", "genai_config.json", "manifest.json",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
    written = json.loads((out / "manifest.json").read_text())
    assert written["format"] == "ortft-export" and written["kind"] == "merged-onnx" and written["format_version"] == 2
    assert written["tokenizer"]["dir"] == "." and written["tokenizer"]["chat_template"] == "chat_template.jinja"
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((lora_bundle.bundle_dir / "inference" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert {key: config[key] for key in ("rope_theta", "rms_norm_eps", "intermediate_size", "tie_word_embeddings")} == \
        {key: source_config[key] for key in ("rope_theta", "rms_norm_eps", "intermediate_size", "tie_word_embeddings")}
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["type"] == "llama" and genai["search"]["past_present_share_buffer"] is False
    assert genai["model"]["decoder"]["head_size"] == 16 and genai["model"]["decoder"]["num_key_value_heads"] == 2
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert len(written["source"]["bundle_manifest_sha256"]) == 64
    assert set(written["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert export_manifest["files"] == written["files"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1 and generation["pad_token_id"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ortft-tmp-")]


def test_zero_b_gives_exactly_the_base_weights(tmp_path):
    bundle = build_bundle(tmp_path / "bundle", "llama", zero_b=True)
    out = tmp_path / "export"
    export_merged_onnx(bundle.bundle_dir, bundle.manifest, bundle.adapter, out)
    import onnx
    from onnx import numpy_helper

    exported = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    template = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(bundle.bundle_dir / "inference" / "model.onnx")).graph.initializer}
    assert exported.keys() == template.keys()
    for name, values in template.items():
        assert exported[name].tobytes() == values.tobytes(), name


def test_merge_weights_maths_and_in_out_layout():
    rng = np.random.default_rng(0)
    base, lora_a, lora_b = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(2, 5)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32)
    magnitude = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
    trainable = [
        {"name": "a", "role": "lora_A", "base_weight": "w", "shape": [2, 5]},
        {"name": "b", "role": "lora_B", "base_weight": "w", "shape": [6, 2]},
    ]
    adapter = {"a": lora_a, "b": lora_b, "m": magnitude}
    for layout, stored in (("out_in", base), ("in_out", base.T.copy())):
        manifest = {"adapter": {"scale": 0.5}, "inference": {"weights": {"w": {"initializer": "w", "layout": layout}}}, "trainable": trainable}
        merged = merge_weights(manifest, {"w": stored}, adapter)["w"]
        expected = base + 0.5 * lora_b @ lora_a
        np.testing.assert_allclose(merged if layout == "out_in" else merged.T, expected, rtol=1e-6, atol=1e-6)
        manifest["trainable"] = trainable + [{"name": "m", "role": "magnitude", "base_weight": "w", "shape": [6]}]
        merged = merge_weights(manifest, {"w": stored}, adapter)["w"]
        expected = magnitude[:, None] * expected / np.linalg.norm(expected, axis=1, keepdims=True)
        np.testing.assert_allclose(merged if layout == "out_in" else merged.T, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_export_loads_in_peft_with_the_same_logits(kind, lora_bundle, dora_bundle, tmp_path):
    import copy

    from peft import PeftModel

    bundle = lora_bundle if kind == "lora" else dora_bundle
    export_peft(bundle.manifest, bundle.adapter, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (kind == "dora")
    loaded = PeftModel.from_pretrained(copy.deepcopy(bundle.base_model), str(tmp_path / "peft")).eval()
    input_ids = _input_ids()
    np.testing.assert_allclose(torch_logits(loaded, input_ids), torch_logits(bundle.peft_model, input_ids), atol=1e-5, rtol=0)


def test_adapter_export_round_trips(lora_bundle, tmp_path):
    from safetensors.numpy import load_file

    export_adapter(lora_bundle.manifest, lora_bundle.adapter, tmp_path / "adapter")
    loaded = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert set(loaded) == set(lora_bundle.adapter)
    for name, value in lora_bundle.adapter.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert json.loads((tmp_path / "adapter" / "manifest.json").read_text())["kind"] == "adapter"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tied_head_cannot_be_merged_silently(tmp_path):
    from ortft.errors import BundleError

    bundle = build_bundle(tmp_path / "bundle", "llama", targets=["lm_head"], tie_word_embeddings=True)
    with pytest.raises(BundleError, match="shares its weights"):
        export_merged_onnx(bundle.bundle_dir, bundle.manifest, bundle.adapter, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ---- run folders and user errors -------------------------------------------------------------------


def test_run_checkpoint_choice(lora_bundle, tmp_path):
    run = make_run(tmp_path / "run", lora_bundle, steps=(5, 20, 10), best_step=10)
    assert resolve_run_checkpoint(run, "latest").checkpoint_dir.name == "step-00000020"
    assert resolve_run_checkpoint(run, "best").checkpoint_dir.name == "step-00000010"
    assert resolve_run_checkpoint(run, "checkpoints/step-00000005").checkpoint_dir.name == "step-00000005"
    file_choice = resolve_run_checkpoint(run, str(run / "checkpoints" / "step-00000005" / "adapter.safetensors"))
    assert file_choice.adapter_path.name == "adapter.safetensors"


def test_run_without_checkpoints_is_a_user_error(lora_bundle, tmp_path):
    run = make_run(tmp_path / "run", lora_bundle, steps=())
    for kind in ("merged-onnx", "peft", "adapter"):
        with pytest.raises(RunError, match="no checkpoint"):
            export_run(run, tmp_path / "out", kind=kind)
    with pytest.raises(RunError, match="no best checkpoint"):
        export_run(run, tmp_path / "out", checkpoint="best")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_not_a_run_folder_and_moved_bundle(lora_bundle, tmp_path):
    with pytest.raises(RunError, match="run.json"):
        export_run(tmp_path, tmp_path / "out")
    run = make_run(tmp_path / "run", lora_bundle)
    info = json.loads((run / "run.json").read_text())
    info["bundle_manifest_sha256"] = "0" * 64
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="not the one"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_that_does_not_fit_is_refused(lora_bundle, tmp_path):
    adapter = dict(lora_bundle.adapter)
    adapter.pop(next(iter(adapter)))
    with pytest.raises(RunError, match="does not fit"):
        export_merged_onnx(lora_bundle.bundle_dir, lora_bundle.manifest, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(lora_bundle, tmp_path):
    run = make_run(tmp_path / "run", lora_bundle)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        export_run(run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_run(run, out, kind="peft", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]


def test_damaged_template_is_refused(lora_bundle, tmp_path):
    import shutil

    from ortft.errors import BundleError

    copy_dir = tmp_path / "bundle"
    shutil.copytree(lora_bundle.bundle_dir, copy_dir)
    with open(copy_dir / "inference" / "model.onnx.data", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="damaged"):
        export_merged_onnx(copy_dir, lora_bundle.manifest, lora_bundle.adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_and_user_errors(lora_bundle, tmp_path):
    from ortft.cli import main

    run = make_run(tmp_path / "run", lora_bundle)
    main(["export", str(run), "--out", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model.onnx").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run), "--out", str(tmp_path / "merged")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path), "--out", str(tmp_path / "other"), "--format", "adapter"])
    assert exit_info.value.code == 2 and not (tmp_path / "other").exists()


def test_device_side_needs_no_torch(lora_bundle, tmp_path):
    run = make_run(tmp_path / "run", lora_bundle)
    script = BLOCK_HOST_PACKAGES + f"""
for fmt in ('merged-onnx', 'onnx-adapter', 'gguf', 'gguf-lora', 'peft', 'adapter'):
    try:
        main(['export', {str(run)!r}, '--out', {str(tmp_path)!r} + '/' + fmt, '--format', fmt])
    except SystemExit as exc:
        assert not exc.code, exc.code
try:
    main(['generate', {str(tmp_path / 'merged-onnx')!r}, '--prompt', 'hello', '--max-new-tokens', '4'])
except SystemExit as exc:
    assert not exc.code, exc.code
try:
    main(['generate', {str(tmp_path / 'onnx-adapter')!r}, '--adapter', 'run', '--prompt', 'hello', '--max-new-tokens', '4'])
except SystemExit as exc:
    assert not exc.code, exc.code
assert 'torch' not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens/s" in result.stderr
