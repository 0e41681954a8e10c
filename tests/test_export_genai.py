"""Tests of genai_config.json and of ortft's exports in onnxruntime-genai 0.18 (in its own venv: scripts/genai-venv.sh).

The consumer runs tests/helpers/genai_runner.py; greedy tokens must equal `ortft generate`'s. Tiny random models
here; SmolLM2 in the slow tests.
"""

from __future__ import annotations

import json

import pytest
from helpers.runtime_venvs import run_genai
from helpers.bundles import build_bundle
from helpers.runs import make_run

from ortft.config import SamplingSettings
from ortft.errors import BundleError
from ortft.export import export_merged_onnx, export_run
from ortft.export_genai import genai_config, genai_model_type
from ortft.generate import Generator

PROMPTS = [[1, 17, 42, 99], [5, 6, 7], [3, 200, 100, 50, 25, 12]]
MAX_NEW = 12


def ortft_greedy(folder, prompts=PROMPTS, max_new_tokens=MAX_NEW, adapter=None) -> list[list[int]]:
    generator = Generator(folder, threads=1, adapter=adapter)
    return [generator.generate_ids(prompt, SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)) for prompt in prompts]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    bundle = build_bundle(root / "bundle", "llama", seed=2)
    return bundle, make_run(root / "run", bundle), root


def test_genai_config_describes_the_graph(llama):
    bundle, _run, _root = llama
    config = json.loads((bundle.bundle_dir / "inference" / "config.json").read_text())
    written = genai_config(bundle.manifest, config, "model.onnx", {"session.disable_quant_qdq": "1"})
    decoder = written["model"]["decoder"]
    assert (written["model"]["type"], decoder["filename"], decoder["head_size"], decoder["hidden_size"]) == ("llama", "model.onnx", 16, 64)
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (4, 2, 2)
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                                 "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    assert decoder["session_options"]["session.disable_quant_qdq"] == "1"
    assert (written["model"]["bos_token_id"], written["model"]["eos_token_id"], written["model"]["pad_token_id"]) == (1, 2, 0)
    assert written["model"]["context_length"] == written["search"]["max_length"] == 256
    assert written["search"]["past_present_share_buffer"] is False and written["search"]["do_sample"] is False
    # several eos ids become a list; no pad id falls back to the first eos id; no config.json: the manifest's facts
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["model"].update(eos_token_ids=[2, 7], pad_token_id=None, num_attention_heads=4)
    manifest["source"]["architecture"] = "Qwen2ForCausalLM"
    written = genai_config(manifest, None)
    assert written["model"]["eos_token_id"] == [2, 7] and written["model"]["pad_token_id"] == 2
    assert written["model"]["type"] == "qwen2" and written["model"]["context_length"] == 256


def test_genai_model_types():
    assert genai_model_type({}, {"architectures": ["Phi3ForCausalLM"]}) == "phi3"
    assert genai_model_type({"source": {"architecture": "MistralForCausalLM"}}, None) == "mistral"
    with pytest.raises(BundleError, match="no model type for architecture BertForSequenceClassification"):
        genai_model_type({}, {"architectures": ["BertForSequenceClassification"]})


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3"])
def test_merged_export_runs_in_genai_with_ortft_greedy_tokens(model_type, llama, tmp_path):
    if model_type == "llama":
        bundle, run, _root = llama
    else:
        bundle = build_bundle(tmp_path / "bundle", model_type, seed=5)
        run = make_run(tmp_path / "run", bundle)
    out = tmp_path / "export"
    export_run(run, out)
    expected = ortft_greedy(out)
    assert sum(len(ids) for ids in expected) > 2 * len(PROMPTS)  # not all stopped at once by an eos
    answer = run_genai({"folder": str(out), "prompts": PROMPTS, "max_new_tokens": MAX_NEW}, tmp_path)
    assert answer["onnxruntime_genai"] == "0.18.0"
    assert answer["generated"]["None"] == expected
    assert answer["eos_token_ids"] == [2]


def test_int4_export_runs_in_genai(llama, tmp_path):
    _bundle, run, _root = llama
    out = tmp_path / "int4"
    export_run(run, out, quantize="int4")
    answer = run_genai({"folder": str(out), "prompts": PROMPTS, "max_new_tokens": MAX_NEW}, tmp_path)
    assert answer["generated"]["None"] == ortft_greedy(out)


def test_genai_tokenizer_and_chat_template_match_ortft(llama, tmp_path):
    from ortft.tokenizer import load_tokenizer

    bundle, _run, _root = llama
    out = tmp_path / "export"
    export_merged_onnx(bundle.bundle_dir, bundle.manifest, bundle.adapter, out)
    texts = ["The capital of France is Paris.", "hello world"]
    messages = [{"role": "user", "content": "hello world"}]
    answer = run_genai({"folder": str(out), "texts": texts, "messages": messages, "max_new_tokens": 4}, tmp_path)
    tokenizer = load_tokenizer(out)
    assert answer["encoded"] == [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    assert answer["chat"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # (a random model's tokens are not valid UTF-8; the decoded text is compared on SmolLM2, in the slow tests)
