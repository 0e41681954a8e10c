"""Tests of `ortft export --format gguf | gguf-lora`: llama.cpp's layout read back with the gguf package, the merged
GGUF loaded by transformers with `ortft generate`'s greedy tokens, llama.cpp (slow: built from source in its own venv)
generating the same tokens from the merged GGUF and from base + LoRA, and clean refusals. Tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.runtime_venvs import llama_cpp_python, ROOT, run_json
from helpers.bundles import build_bundle
from helpers.runs import make_run

from ortft.config import SamplingSettings
from ortft.errors import BundleError, ConfigError
from ortft.export import export_run, merge_weights
from ortft.export_gguf import export_gguf, export_gguf_lora
from ortft.generate import Generator
from ortft.gguf_layout import permute_rows
from ortft.gguf_vocab import pre_tokenizer_name

PROMPTS = [[1, 17, 42, 99], [5, 6, 7], [3, 200, 100, 50]]
MAX_NEW = 12


def _reader(path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(reader) -> dict[str, np.ndarray]:
    """GGUF tensors as float32 numpy arrays in Hugging Face's [out, in] shape (dequantized)."""
    import gguf

    tensors = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = np.asarray(values, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])
    return tensors


def _zero_b(adapter: dict) -> dict:
    return {name: (np.zeros_like(value) if ".lora_B." in name else value) for name, value in adapter.items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    bundle = build_bundle(root / "bundle", "llama", seed=1)
    run = make_run(root / "run", bundle)
    export_run(run, root / "onnx")
    export_run(run, root / "gguf-f32", kind="gguf", gguf_type="f32")
    export_run(run, root / "lora", kind="gguf-lora")
    export_gguf(bundle.bundle_dir, bundle.manifest, _zero_b(bundle.adapter), root / "base", "f32")
    generator = Generator(root / "onnx", threads=1)
    expected = [generator.generate_ids(prompt, SamplingSettings(max_new_tokens=MAX_NEW, temperature=0)) for prompt in PROMPTS]
    return {"bundle": bundle, "run": run, "root": root, "expected": expected}


def test_merged_gguf_reads_back_in_llama_cpp_layout(llama):
    bundle, root = llama["bundle"], llama["root"]
    reader = _reader(root / "gguf-f32" / "model.gguf")
    config = json.loads((bundle.bundle_dir / "inference" / "config.json").read_text())
    assert _field(reader, "general.architecture") == "llama" and _field(reader, "general.file_type") == 0
    for key, value in (("llama.block_count", 2), ("llama.embedding_length", 64), ("llama.feed_forward_length", 128),
                       ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 2), ("llama.rope.dimension_count", 16),
                       ("llama.context_length", config["max_position_embeddings"]), ("llama.vocab_size", 320)):
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    tokenizer = json.loads((bundle.bundle_dir / "tokenizer" / "tokenizer.json").read_text())
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 320 and all(tokens[index] == text for text, index in tokenizer["model"]["vocab"].items())
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in tokenizer["model"]["merges"]]
    assert [_field(reader, "tokenizer.ggml.token_type")[index] for index in (0, 1, 2, 100)] == [3, 3, 3, 1]
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id"),
            _field(reader, "tokenizer.ggml.padding_token_id")) == (1, 2, 0)
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True and _field(reader, "tokenizer.ggml.add_eos_token") is False
    assert _field(reader, "tokenizer.chat_template") == (bundle.bundle_dir / "tokenizer" / "chat_template.jinja").read_text()
    tensors = _tensors(reader)
    assert len(tensors) == 21 and "output.weight" in tensors  # untied head: a tensor of its own
    merged = merge_weights(bundle.manifest, {name: dict(bundle.base_model.named_parameters())[name].detach().numpy()
                                             for name in bundle.manifest["inference"]["weights"]}, bundle.adapter)
    # q and k rows in llama.cpp's order (pairs per head), v as it is
    np.testing.assert_allclose(tensors["blk.0.attn_q.weight"], permute_rows(merged["model.layers.0.self_attn.q_proj.weight"], 4), rtol=0, atol=1e-6)
    np.testing.assert_allclose(tensors["blk.1.attn_k.weight"], permute_rows(merged["model.layers.1.self_attn.k_proj.weight"], 2), rtol=0, atol=1e-6)
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight"], merged["model.layers.0.self_attn.v_proj.weight"], rtol=0, atol=1e-6)
    assert not np.allclose(tensors["blk.0.attn_q.weight"], merged["model.layers.0.self_attn.q_proj.weight"])
    assert (root / "gguf-f32" / "Modelfile").read_text() == "FROM ./model.gguf\n"


def test_permute_rows_is_llama_cpp_order():
    rows = np.arange(8, dtype=np.float32)[:, None]  # one head of 8 rows: halves (0..3) (4..7) become pairs
    assert permute_rows(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3"])
def test_transformers_loads_the_merged_gguf_with_ortft_greedy_tokens(model_type, llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    if model_type == "llama":
        run, root, expected, bundle = llama["run"], llama["root"], llama["expected"], llama["bundle"]
    else:
        bundle = build_bundle(tmp_path / "bundle", model_type, seed=1)
        run = make_run(tmp_path / "run", bundle)
        root = tmp_path
        export_run(run, root / "onnx")
        generator = Generator(root / "onnx", threads=1)
        expected = [generator.generate_ids(prompt, SamplingSettings(max_new_tokens=MAX_NEW, temperature=0)) for prompt in PROMPTS]
        export_run(run, root / "gguf-f32", kind="gguf", gguf_type="f32")
    assert sum(len(ids) for ids in expected) > 2 * len(PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(str(root / "gguf-f32"), gguf_file="model.gguf").eval()
    for prompt, tokens in zip(PROMPTS, expected):
        output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=0)
        produced = output[0, len(prompt):].tolist()
        assert produced[: len(tokens)] == tokens and produced[len(tokens):] in ([], [2])
    input_ids = torch.tensor([PROMPTS[0] + PROMPTS[1]])
    with torch.no_grad():
        np.testing.assert_allclose(model(input_ids).logits.numpy(), bundle.peft_model(input_ids).logits.numpy(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_smaller_types_hold_the_rounded_weights(gguf_type, llama, tmp_path):
    import gguf

    root = llama["root"]
    export_run(llama["run"], tmp_path / "out", kind="gguf", gguf_type=gguf_type)
    reader = _reader(tmp_path / "out" / "model.gguf")
    assert _field(reader, "general.file_type") == {"f16": 1, "q8_0": 7}[gguf_type]
    kinds = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    wanted = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    assert kinds["blk.0.ffn_down.weight"] == wanted and kinds["token_embd.weight"] == wanted
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay float32
    full = _tensors(_reader(root / "gguf-f32" / "model.gguf"))
    rounded = _tensors(reader)
    for name, values in full.items():
        if values.ndim == 2:
            expected = values.astype(np.float16).astype(np.float32) if gguf_type == "f16" else \
                gguf.quants.dequantize(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
            np.testing.assert_array_equal(rounded[name], expected)
    size = (tmp_path / "out" / "model.gguf").stat().st_size
    assert size < (0.55 if gguf_type == "f16" else 0.3) * (root / "gguf-f32" / "model.gguf").stat().st_size + 40_000


def test_lora_gguf_reads_back_and_adds_up_to_the_merged_model(llama):
    root = llama["root"]
    reader = _reader(root / "lora" / "adapter.gguf")
    settings = llama["bundle"].manifest["adapter"]
    assert _field(reader, "general.type") == "adapter" and _field(reader, "adapter.type") == "lora"
    assert _field(reader, "general.architecture") == "llama"
    alpha = _field(reader, "adapter.lora.alpha")
    assert alpha == pytest.approx(settings["scale"] * settings["rank"])
    lora = _tensors(reader)
    assert len(lora) == 2 * 14 and lora["blk.0.attn_q.weight.lora_a"].shape == (4, 64)
    base, merged = _tensors(_reader(root / "base" / "model.gguf")), _tensors(_reader(root / "gguf-f32" / "model.gguf"))
    for name in base:
        if f"{name}.lora_a" in lora:  # what llama.cpp computes: W + alpha / r * B A, all in its row order
            applied = base[name] + alpha / settings["rank"] * lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"]
            np.testing.assert_allclose(applied, merged[name], rtol=0, atol=1e-5)
        else:
            np.testing.assert_array_equal(base[name], merged[name])


def test_refusals(llama, tmp_path):
    bundle, run = llama["bundle"], llama["run"]
    dora = build_bundle(tmp_path / "dora", "llama", dora=True)
    with pytest.raises(BundleError, match="cannot carry DoRA"):
        export_gguf_lora(dora.bundle_dir, dora.manifest, dora.adapter, tmp_path / "x")
    export_gguf(dora.bundle_dir, dora.manifest, dora.adapter, tmp_path / "dora-merged", "f32")  # merged DoRA is fine
    gemma = build_bundle(tmp_path / "gemma", "gemma")
    with pytest.raises(BundleError, match="does not support model type 'gemma'"):
        export_gguf(gemma.bundle_dir, gemma.manifest, gemma.adapter, tmp_path / "x")
    old = json.loads(json.dumps(bundle.manifest))
    del old["inference"]["config"]
    with pytest.raises(BundleError, match="keeps no config.json"):
        export_gguf(bundle.bundle_dir, old, bundle.adapter, tmp_path / "x")
    with pytest.raises(ConfigError, match="--gguf-type applies to --format gguf only"):
        export_run(run, tmp_path / "x", kind="gguf-lora", gguf_type="f16")
    with pytest.raises(ConfigError, match="use --gguf-type q8_0"):
        export_run(run, tmp_path / "x", kind="gguf", quantize="int8")
    unigram = json.loads(json.dumps(bundle.manifest))
    unigram["tokenizer"]["source_facts"] = {"tokenizer_model": "llama"}
    with pytest.raises(BundleError, match="byte-level BPE"):
        export_gguf(bundle.bundle_dir, unigram, bundle.adapter, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name(digits) == "smollm"
    split = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated"}, byte_level]}
    assert pre_tokenizer_name(split) == "smollm"
    assert pre_tokenizer_name({"type": "Metaspace"}) == "default" and pre_tokenizer_name(None) == "default"


# ---- llama.cpp itself (llama-cpp-python built from the registry's source package: ~30 min the first time) ----


@pytest.mark.slow
def test_llama_cpp_generates_ortft_greedy_tokens_from_merged_and_base_plus_lora(llama, tmp_path):
    root = llama["root"]
    python = llama_cpp_python()
    runner = ROOT / "tests" / "helpers" / "llama_cpp_runner.py"
    request = {"prompts": PROMPTS, "texts": ["The capital of France is Paris."], "max_new_tokens": MAX_NEW}
    merged = run_json(python, runner, {**request, "model": str(root / "gguf-f32" / "model.gguf")}, tmp_path)
    with_lora = run_json(python, runner, {**request, "model": str(root / "base" / "model.gguf"),
                                          "lora": str(root / "lora" / "adapter.gguf")}, tmp_path)
    assert merged["generated"] == llama["expected"] and with_lora["generated"] == llama["expected"]
    tokenizer = Generator(root / "onnx", threads=1).tokenizer
    assert merged["tokenized"] == [tokenizer.encode("The capital of France is Paris.")]
    assert (merged["bos"], merged["eos"]) == (1, 2)


def test_tied_lm_head_lora_is_refused_for_gguf_lora(tmp_path):
    bundle = build_bundle(tmp_path / "bundle", "llama", targets=["q_proj", "lm_head"], tie_word_embeddings=True)
    with pytest.raises(BundleError, match="no tensor of its own"):
        export_gguf_lora(bundle.bundle_dir, bundle.manifest, bundle.adapter, tmp_path / "x")
    with pytest.raises(BundleError, match="shares its weights"):
        export_gguf(bundle.bundle_dir, bundle.manifest, bundle.adapter, tmp_path / "x")
