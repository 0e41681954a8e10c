"""Tests of the inference template export: logits equal transformers', the KV cache works, weights keep HF names.

Tiny random Llama, Mistral, Qwen2, Phi-3 and Gemma configs; nothing is downloaded.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest

from ortft.prepare.tiny import tiny_config

ARCHITECTURES = ["llama", "mistral", "qwen2", "phi3", "gemma"]


def _model(model_type: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def exported(request, tmp_path_factory):
    from ortft.prepare.inference import export_inference_template

    model = _model(request.param)
    out = tmp_path_factory.mktemp(f"template-{request.param}")
    started = time.perf_counter()
    section = export_inference_template(model, out)
    section["export_s"] = time.perf_counter() - started
    return request.param, model, out, section


def _session(out):
    import onnxruntime as ort

    return ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


def _empty_cache(section, batch: int = 1) -> dict:
    shape = (batch, section["num_key_value_heads"], 0, section["head_dim"])
    feeds = {}
    for layer in range(section["num_layers"]):
        feeds[f"past_key_values.{layer}.key"] = np.zeros(shape, np.float32)
        feeds[f"past_key_values.{layer}.value"] = np.zeros(shape, np.float32)
    return feeds


def test_template_logits_equal_transformers(exported):
    from helpers.reference import onnx_logits, torch_logits

    _name, model, out, _section = exported
    input_ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(2, 9)).astype(np.int64)
    np.testing.assert_allclose(onnx_logits(out / "model.onnx", input_ids), torch_logits(model, input_ids), atol=1e-4, rtol=0)


def test_kv_cache_steps_equal_full_sequence(exported):
    _name, model, out, section = exported
    session = _session(out)
    present_names = [o["name"] for o in section["outputs"] if o["name"].startswith("present.")]
    input_ids = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(1, 8)).astype(np.int64)
    full = session.run(["logits"], {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
                                    "position_ids": np.arange(8)[None], **_empty_cache(section)})[0]
    cache = _empty_cache(section)
    prefix = 3  # a prompt of 3 tokens, then one token at a time
    step_logits = []
    for start, stop in [(0, prefix)] + [(t, t + 1) for t in range(prefix, 8)]:
        outputs = session.run(["logits", *present_names], {
            "input_ids": input_ids[:, start:stop], "attention_mask": np.ones((1, stop), np.int64),
            "position_ids": np.arange(start, stop)[None], **cache,
        })
        step_logits.append(outputs[0])
        cache = {name.replace("present.", "past_key_values."): value for name, value in zip(present_names, outputs[1:])}
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), full, atol=1e-5, rtol=0)


def test_every_linear_weight_is_an_hf_named_initializer(exported):
    import torch

    name, model, out, section = exported
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    initializers = {tensor.name: list(tensor.dims) for tensor in graph.graph.initializer}
    linear_names = {f"{module_name}.weight" for module_name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert set(section["weights"]) == linear_names
    for hf_name, facts in section["weights"].items():
        assert facts["layout"] == "out_in"
        assert initializers[facts["initializer"]] == list(model.get_parameter(hf_name).shape)
    if name == "phi3":
        assert "model.layers.0.self_attn.qkv_proj.weight" in section["weights"]
        assert "model.layers.0.mlp.gate_up_proj.weight" in section["weights"]
    assert all(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in graph.graph.initializer)
    assert (out / "model.onnx.data").is_file()


def test_section_describes_inputs_and_outputs(exported):
    _name, model, _out, section = exported
    input_names = [value["name"] for value in section["inputs"]]
    assert input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert input_names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    output_names = [value["name"] for value in section["outputs"]]
    assert output_names[0] == "logits" and "present.1.value" in output_names
    assert section["num_layers"] == model.config.num_hidden_layers
    assert section["model"] == "inference/model.onnx"
    assert section["export_s"] < 30


def test_tied_lm_head_points_at_the_embedding(tmp_path):
    from ortft.prepare.inference import export_inference_template

    model = _model("llama", tie_word_embeddings=True)
    section = export_inference_template(model, tmp_path)
    assert section["weights"]["lm_head.weight"]["initializer"] == "model.embed_tokens.weight"
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert sum(tensor.name == "model.embed_tokens.weight" for tensor in graph.graph.initializer) == 1
    assert not any(tensor.name == "lm_head.weight" for tensor in graph.graph.initializer)


def test_the_source_configuration_is_kept(tmp_path):
    """config.json beside the template: every setting spelled out, the exported model's class, no storage details."""
    import json

    from ortft.prepare.inference import export_inference_template

    model = _model("llama")
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF source's config carries
    section = export_inference_template(model, tmp_path)
    assert section["config"] == "inference/config.json"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "quantization_config" not in config and "_name_or_path" not in config
    for key in ("rope_theta", "rms_norm_eps", "intermediate_size", "tie_word_embeddings", "max_position_embeddings"):
        assert config[key] == getattr(model.config, key), key


def test_export_leaves_the_model_as_it_was(tmp_path):
    from ortft.prepare.inference import export_inference_template

    model = _model("llama")
    model.train()
    model.config.return_dict = False
    export_inference_template(model, tmp_path)
    assert model.training and model.config.return_dict is False


def test_a_raw_export_with_one_file_per_weight_leaves_only_the_template(tmp_path, monkeypatch):
    """torch.onnx.export writes models over 2 GB as one external file per weight; none may stay behind."""
    from ortft.prepare import inference

    real_export = inference._torch_export

    def export_like_a_large_model(model, onnx_config, path, opset):
        real_export(model, onnx_config, path, opset)
        raw = onnx.load(str(path))
        onnx.save_model(raw, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    monkeypatch.setattr(inference, "_torch_export", export_like_a_large_model)
    model = _model("llama")
    inference.export_inference_template(model, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "model.onnx", "model.onnx.data"]
    from helpers.reference import onnx_logits, torch_logits

    input_ids = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(1, 7)).astype(np.int64)
    np.testing.assert_allclose(onnx_logits(tmp_path / "model.onnx", input_ids), torch_logits(model, input_ids), atol=1e-4, rtol=0)
