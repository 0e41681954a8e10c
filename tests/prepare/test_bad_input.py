"""ortft prepare refuses bad input with a clear user error and never leaves a partial bundle."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ortft.errors import AdapterError, DiskWriteError, InputNotFoundError, ModelError, OutputExistsError, UserError

from helpers.bundles import prepare_tiny


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(".ortft-tmp-")]


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        prepare_tiny(tmp_path / "nope", tmp_path / "b")


def test_hub_name_says_ortft_never_downloads(tmp_path):
    with pytest.raises(InputNotFoundError) as info:
        prepare_tiny(Path("HuggingFaceTB/SmolLM2-135M"), tmp_path / "b")
    assert "never downloads" in info.value.hint


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        prepare_tiny(tmp_path / "m", tmp_path / "b")


def test_folder_without_weights(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder)
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        prepare_tiny(folder, tmp_path / "b")


def test_pickle_weights_are_refused(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError, match="pickle"):
        prepare_tiny(folder, tmp_path / "b")


def test_trust_remote_code_is_refused(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="custom code"):
        prepare_tiny(folder, tmp_path / "b")


def test_unsupported_architecture_lists_supported(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 320}))
    with pytest.raises(ModelError, match="not supported") as info:
        prepare_tiny(folder, tmp_path / "b")
    assert "llama" in info.value.hint and "phi3" in info.value.hint
    _no_leftovers(tmp_path, "b")


def test_target_that_matches_nothing_lists_layers(tiny_llama, tmp_path):
    with pytest.raises(AdapterError, match="matches no linear layer") as info:
        prepare_tiny(tiny_llama, tmp_path / "b", targets="q_proj,attn_c")
    assert "q_proj" in info.value.hint and "down_proj" in info.value.hint
    _no_leftovers(tmp_path, "b")


def test_rank_below_one(tiny_llama, tmp_path):
    with pytest.raises(AdapterError, match="rank"):
        prepare_tiny(tiny_llama, tmp_path / "b", rank=0)


def test_layers_larger_than_model(tiny_llama, tmp_path):
    with pytest.raises(AdapterError, match="2 transformer layers"):
        prepare_tiny(tiny_llama, tmp_path / "b", layers=3)
    _no_leftovers(tmp_path, "b")


def test_adapter_for_another_base_is_refused(tiny_model_factory, tiny_llama, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = tiny_model_factory("llama", hidden_size=32, intermediate_size=64)
    model = AutoModelForCausalLM.from_pretrained(str(other))
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(AdapterError, match="does not fit this model"):
        prepare_tiny(tiny_llama, tmp_path / "b", adapter=str(tmp_path / "adapter"))
    _no_leftovers(tmp_path, "b")


def test_existing_output_without_force(tiny_llama, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        prepare_tiny(tiny_llama, tmp_path / "b")
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"


def test_full_disk_midway_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    from ortft.prepare import pipeline

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "_save_tokenizer", disk_full)
    with pytest.raises(DiskWriteError, match="disk is full"):
        prepare_tiny(tiny_llama, tmp_path / "b")
    _no_leftovers(tmp_path, "b")


def test_force_keeps_old_bundle_when_new_one_fails(tiny_llama, tmp_path):
    prepare_tiny(tiny_llama, tmp_path / "b")
    before = (tmp_path / "b" / "manifest.json").read_bytes()
    with pytest.raises(UserError):
        prepare_tiny(tiny_llama, tmp_path / "b", force=True, targets="nothing_here")
    assert (tmp_path / "b" / "manifest.json").read_bytes() == before


def test_unwritable_output_folder(tiny_llama, tmp_path):
    import os

    if os.geteuid() == 0:
        # root ignores permission bits: a path under a regular file fails just as early
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "b"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "b"
    with pytest.raises(UserError):
        prepare_tiny(tiny_llama, out)


def test_cli_user_error_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ortft", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "b")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_adapter_with_a_contradicting_rank_is_refused(tiny_llama, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "adapter"))
    result = subprocess.run(
        [sys.executable, "-m", "ortft", "prepare", str(tiny_llama), "--out", str(tmp_path / "b"),
         "--adapter", str(tmp_path / "adapter"), "--rank", "8"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "--rank 8 contradicts the adapter" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()
