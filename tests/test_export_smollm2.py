"""Slow: SmolLM2-135M-Instruct (real weights, from its GGUF) exported in every serving format and run by each real
consumer: Optimum, onnxruntime-genai (merged, int4, several adapters), transformers and llama.cpp (GGUF, GGUF LoRA).
Greedy tokens must equal `ortft generate`'s. The bundle holds each weight once (<= 650 MB)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.runtime_venvs import llama_cpp_python, ROOT, run_genai, run_json

from ortft.config import SamplingSettings
from ortft.export import export_merged_onnx
from ortft.export_adapter_onnx import export_onnx_adapter
from ortft.export_gguf import export_gguf, export_gguf_lora
from ortft.generate import Generator
from ortft.manifest import read_manifest

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Give the plural form of \"mouse\"."]
MAX_NEW = 24
GREEDY = SamplingSettings(max_new_tokens=MAX_NEW, temperature=0)


def _adapter(manifest: dict, seed: int, b_scale: float) -> dict[str, np.ndarray]:
    """A random LoRA (B != 0); a small one changes the logits without turning the answers into noise."""
    rng = np.random.default_rng(seed)
    return {entry["name"]: (rng.standard_normal(entry["shape"]) * (0.02 if entry["role"] == "lora_A" else b_scale)).astype(np.float32)
            for entry in manifest["trainable"]}


def _zero_b(adapter: dict) -> dict:
    return {name: (np.zeros_like(value) if ".lora_B." in name else value) for name, value in adapter.items()}


@pytest.fixture(scope="module")
def smol(smollm2_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol-exports")
    manifest = read_manifest(smollm2_bundle)
    adapters = {"first": _adapter(manifest, 0, 0.002), "second": _adapter(manifest, 1, 0.2)}  # the second changes the answers
    for name, adapter in adapters.items():
        export_merged_onnx(smollm2_bundle, manifest, adapter, root / f"merged-{name}")
        export_onnx_adapter(smollm2_bundle, manifest, adapter, root / "served", name)
    generator = Generator(root / "merged-first", threads=2)
    prompts = [generator.tokenizer.encode(generator.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                                          add_special_tokens=False) for q in QUESTIONS]
    expected = {name: [Generator(root / f"merged-{name}", threads=2).generate_ids(p, GREEDY) for p in prompts] for name in adapters}
    return {"bundle": smollm2_bundle, "manifest": manifest, "adapters": adapters, "root": root, "prompts": prompts,
            "expected": expected, "tokenizer": generator.tokenizer}


def test_the_bundle_holds_each_weight_once(smol):
    manifest = smol["manifest"]
    total = sum(facts["bytes"] for facts in manifest["files"].values())
    assert total <= 650e6, total
    assert manifest["inference"]["model"] == "inference_model.onnx"
    assert manifest["inference"]["shared_weights"]["frozen_weights.data"] == len(manifest["inference"]["parameters"]) == 272
    config = json.loads((smol["bundle"] / "inference" / "config.json").read_text())
    assert (config["rope_theta"], config["rms_norm_eps"], config["intermediate_size"], config["tie_word_embeddings"]) == \
        (100000.0, pytest.approx(1e-5), 1536, True)


def test_answers_are_text_and_adapters_differ(smol):
    tokenizer = smol["tokenizer"]
    first = [tokenizer.decode(ids, skip_special_tokens=True) for ids in smol["expected"]["first"]]
    assert "Paris" in first[0] and all(len(ids) > 3 for ids in smol["expected"]["first"])
    assert smol["expected"]["first"] != smol["expected"]["second"]


def test_onnxruntime_genai_runs_merged_and_several_adapters(smol, tmp_path):
    root = smol["root"]
    merged = run_genai({"folder": str(root / "merged-first"), "prompts": smol["prompts"], "max_new_tokens": MAX_NEW,
                        "texts": QUESTIONS[:1], "messages": [{"role": "user", "content": QUESTIONS[0]}]}, tmp_path)
    assert merged["generated"]["None"][: len(QUESTIONS)] == smol["expected"]["first"]
    tokenizer = smol["tokenizer"]
    assert merged["decoded"]["None"][: len(QUESTIONS)] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in smol["expected"]["first"]]
    assert merged["encoded"] == [tokenizer.encode(QUESTIONS[0], add_special_tokens=False)]
    assert merged["chat"] == tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    served = root / "served"
    adapters = {name: str(served / "adapters" / f"{name}.onnx_adapter") for name in smol["adapters"]}
    answer = run_genai({"folder": str(served), "prompts": smol["prompts"], "max_new_tokens": MAX_NEW, "adapters": adapters,
                        "runs": ["first", "second"]}, tmp_path)
    assert answer["generated"] == smol["expected"]
    for name in smol["adapters"]:
        assert [Generator(served, threads=2, adapter=name).generate_ids(p, GREEDY) for p in smol["prompts"]] == smol["expected"][name]


def test_onnxruntime_genai_runs_the_int4_export(smol, tmp_path):
    out = tmp_path / "int4"
    export_merged_onnx(smol["bundle"], smol["manifest"], smol["adapters"]["first"], out, quantize="int4")
    expected = [Generator(out, threads=2).generate_ids(p, GREEDY) for p in smol["prompts"]]
    answer = run_genai({"folder": str(out), "prompts": smol["prompts"], "max_new_tokens": MAX_NEW}, tmp_path)
    assert answer["generated"]["None"] == expected


def test_optimum_runs_the_merged_export(smol):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(str(smol["root"] / "merged-first"))
    eos = smol["manifest"]["model"]["eos_token_ids"]
    for prompt, expected in zip(smol["prompts"], smol["expected"]["first"]):
        output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        produced = output[0, len(prompt):].tolist()
        assert produced[: len(expected)] == expected and produced[len(expected):] in ([], eos[:1])


def test_gguf_in_transformers_and_llama_cpp(smol, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    bundle, manifest, adapter = smol["bundle"], smol["manifest"], smol["adapters"]["first"]
    export_gguf(bundle, manifest, adapter, tmp_path / "merged", "f32")
    export_gguf(bundle, manifest, _zero_b(adapter), tmp_path / "base", "f32")
    export_gguf_lora(bundle, manifest, adapter, tmp_path / "lora")
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "merged" / "model.gguf"))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm" and reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2
    expected = smol["expected"]["first"]
    eos = manifest["model"]["eos_token_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), gguf_file="model.gguf", dtype=torch.float32).eval()
    for prompt, tokens in zip(smol["prompts"], expected):
        output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        produced = output[0, len(prompt):].tolist()
        assert produced[: len(tokens)] == tokens and produced[len(tokens):] in ([], eos[:1])
    python = llama_cpp_python()
    runner = ROOT / "tests" / "helpers" / "llama_cpp_runner.py"
    request = {"prompts": smol["prompts"], "max_new_tokens": MAX_NEW, "texts": QUESTIONS}
    merged = run_json(python, runner, {**request, "model": str(tmp_path / "merged" / "model.gguf")}, tmp_path)
    with_lora = run_json(python, runner, {**request, "model": str(tmp_path / "base" / "model.gguf"),
                                          "lora": str(tmp_path / "lora" / "adapter.gguf")}, tmp_path)
    assert merged["generated"] == expected and with_lora["generated"] == expected
    assert merged["tokenized"] == [smol["tokenizer"].encode(question) for question in QUESTIONS]
