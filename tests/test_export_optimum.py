"""A merged-onnx export loads unchanged in Optimum (`ORTModelForCausalLM.from_pretrained`) and in transformers'
AutoTokenizer / AutoConfig, and Optimum's greedy tokens equal `ortft generate`'s (tiny random models)."""

from __future__ import annotations

import json

import pytest
from helpers.bundles import build_bundle
from helpers.runs import make_run

from ortft.config import SamplingSettings
from ortft.export import export_run
from ortft.generate import Generator

PROMPTS = [[1, 17, 42, 99], [5, 6, 7]]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_optimum_loads_the_merged_export(model_type, tmp_path):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig, AutoTokenizer

    bundle = build_bundle(tmp_path / "bundle", model_type, seed=3)
    out = tmp_path / "export"
    export_run(make_run(tmp_path / "run", bundle), out)
    source = json.loads((bundle.bundle_dir / "inference" / "config.json").read_text())
    config = AutoConfig.from_pretrained(str(out))
    assert config.model_type == model_type and config.num_hidden_layers == source["num_hidden_layers"]
    assert config.rope_theta == source["rope_theta"] and config.rms_norm_eps == source["rms_norm_eps"]
    model = ORTModelForCausalLM.from_pretrained(str(out))
    generator = Generator(out, threads=1)
    settings = SamplingSettings(max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    for prompt in PROMPTS:
        expected = generator.generate_ids(prompt, settings)
        output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
        produced = output[0, len(prompt):].tolist()
        assert produced[: len(expected)] == expected and produced[len(expected):] in ([], [2])
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ortft_tokenizer = generator.tokenizer
    assert tokenizer("hello world").input_ids == ortft_tokenizer.encode("hello world")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == \
        ortft_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
