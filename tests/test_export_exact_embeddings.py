"""`ortft export` of a bundle whose embedding table is stored as exact int8 (`quantization.embeddings == "int8-exact"`:
a GGUF's Q8_0 table, int8 x a scale per 32 values) in every format a causal LM has: each computes what the bundle's
eval graph computes (its loss on a batch; the logits of PyTorch + PEFT on the template's dequantized base), and the
table stays exact: float32 in merged exports, int8 in onnx-adapter's base, bit for bit in a q8_0 GGUF.

The bundle is a tiny tied Llama with such a table, prepared with --quantize int4 (the linear weights int4, as for
SmolLM2's GGUF), its adapters random and then trained one step. Nothing is downloaded.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.bundles import tiny_bundle
from helpers.reference import (
    batch_for,
    causal_lm_loss,
    onnx_adapter_logits,
    onnx_logits,
    randomize_adapters,
    template_base_model,
    torch_logits,
    torch_peft_model,
)
from helpers.runs import make_run

from ortft.config import SamplingSettings
from ortft.inference_template import DEQUANTIZE_SESSION_CONFIG, InferenceTemplate
from ortft.manifest import read_manifest
from ortft.runtime import TrainingSession

TABLE = "model.embed_tokens.weight"
LOGITS_ATOL = 1e-4
LOSS_REL = 1e-5
PROMPT = [1, 17, 42, 99]


@pytest.fixture(scope="module")
def trained(q8_0_llama, tmp_path_factory):
    """The int8-exact bundle, a run holding its trained adapter, the eval graph's loss on a batch, and the logits
    PyTorch + PEFT compute with that adapter on the template's base."""
    bundle = tiny_bundle(tmp_path_factory, q8_0_llama, "llama-q8_0-int4", quantize="int4")
    manifest = read_manifest(bundle)
    assert manifest["quantization"]["embeddings"] == "int8-exact"
    session = TrainingSession(bundle, threads=1)
    randomize_adapters(session, manifest)  # every LoRA B non-zero, so the adapter moves the logits
    batch = batch_for(manifest)
    session.train_step_forward_backward(batch)
    session.optimizer_step(5e-3)
    adapter = {name: session.parameter(name).copy() for name in session.trainable_names()}
    eval_loss = float(np.asarray(session.evaluate(batch)))
    root = tmp_path_factory.mktemp("exact-exports")
    run = make_run(root / "run", SimpleNamespace(bundle_dir=bundle, adapter=adapter))
    base = template_base_model(manifest, q8_0_llama, bundle)
    base_logits = torch_logits(base, batch["input_ids"])
    reference = torch_logits(torch_peft_model(manifest, q8_0_llama, adapter, base_model=base), batch["input_ids"])
    assert causal_lm_loss(reference, batch["labels"]) == pytest.approx(eval_loss, rel=LOSS_REL)  # the reference is the eval graph's
    assert np.abs(reference - base_logits).max() > 1e-2  # the adapter matters
    table = InferenceTemplate(bundle, manifest).read_parameter(TABLE)
    return SimpleNamespace(bundle=bundle, manifest=manifest, run=run, root=root, adapter=adapter, batch=batch, eval_loss=eval_loss,
                           reference=reference, table=table, model_dir=q8_0_llama)


def _export(trained, name: str, *options: str):
    """`ortft export RUN --out ROOT/NAME OPTIONS...`; returns the export folder and its manifest."""
    from click.testing import CliRunner

    from ortft.cli import cli

    out = trained.root / name
    if not out.exists():
        result = CliRunner().invoke(cli, ["export", str(trained.run), "--out", str(out), *options])
        assert result.exit_code == 0, (result.output, result.exception)
    return out, json.loads((out / "manifest.json").read_text())


def _assert_same_as_eval_graph(trained, logits: np.ndarray) -> None:
    np.testing.assert_allclose(logits, trained.reference, atol=LOGITS_ATOL, rtol=0)
    assert np.array_equal(logits.argmax(-1), trained.reference.argmax(-1))  # the same next tokens
    assert causal_lm_loss(logits, trained.batch["labels"]) == pytest.approx(trained.eval_loss, rel=LOSS_REL)


def _initializers(model_path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(str(model_path)).graph.initializer}


def _greedy(folder, adapter: str | None = None) -> list[int]:
    from ortft.generate import Generator

    return Generator(folder, threads=1, adapter=adapter).generate_ids(PROMPT, SamplingSettings(max_new_tokens=8, temperature=0))


def test_merged_onnx_computes_the_eval_graph_with_the_table_in_float32(trained):
    out, manifest = _export(trained, "merged")
    assert manifest["kind"] == "merged-onnx" and "quantization" not in manifest
    _assert_same_as_eval_graph(trained, onnx_logits(out / "model.onnx", trained.batch["input_ids"]))
    value = trained.manifest["inference"]["parameters"][TABLE]["value"]
    stored = _initializers(out / "model.onnx")[value]
    assert stored.dtype == np.float32 and np.array_equal(stored, trained.table)  # dequantized losslessly
    assert _greedy(out) == _greedy(_export(trained, "served", "--format", "onnx-adapter", "--adapter-name", "tuned")[0], "tuned")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_requantized_merged_onnx_keeps_the_table_and_tied_head_float32(trained, scheme):
    out, manifest = _export(trained, f"merged-{scheme}", "--quantize", scheme)
    section = manifest["quantization"]
    assert "lm_head.weight" in section["skipped"] and section["quantized_layers"] == 14  # 2 layers x 7 linears
    value = trained.manifest["inference"]["parameters"][TABLE]["value"]
    assert np.array_equal(_initializers(out / "model.onnx")[value], trained.table)
    session_config = {"session.disable_quant_qdq": "1"} if scheme == "int8" else None
    logits = onnx_logits(out / "model.onnx", trained.batch["input_ids"], session_config)
    relative = np.linalg.norm(logits - trained.reference) / np.linalg.norm(trained.reference)
    assert 0 < relative < (0.05 if scheme == "int8" else 0.5), relative  # the linear weights' quantization error only


def test_onnx_adapter_keeps_the_table_int8_and_computes_the_eval_graph(trained):
    import onnx

    out, manifest = _export(trained, "served", "--format", "onnx-adapter", "--adapter-name", "tuned")
    assert manifest["session_config"] == DEQUANTIZE_SESSION_CONFIG
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    value = trained.manifest["inference"]["parameters"][TABLE]["value"]
    dequantize = next(node for node in graph.node if node.output[0] == value)
    int8_table = next(tensor for tensor in graph.initializer if tensor.name == dequantize.input[0])
    assert dequantize.op_type == "DequantizeLinear" and {a.name: a.i for a in dequantize.attribute}["block_size"] == 32
    assert int8_table.data_type == onnx.TensorProto.INT8 and list(int8_table.dims) == list(trained.table.shape)
    logits = onnx_adapter_logits(out, "tuned", trained.batch["input_ids"], DEQUANTIZE_SESSION_CONFIG)
    _assert_same_as_eval_graph(trained, logits)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_gguf_holds_the_table_and_f32_computes_the_eval_graph(trained, gguf_type):
    import gguf

    out, _manifest = _export(trained, f"gguf-{gguf_type}", "--format", "gguf", "--gguf-type", gguf_type)
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert "output.weight" not in tensors  # the tied head reads token_embd
    table = tensors["token_embd.weight"]
    values = np.asarray(gguf.quants.dequantize(table.data, table.tensor_type), np.float32).reshape(trained.table.shape)
    if gguf_type == "q8_0":  # the GGUF's Q8_0 table again, bit for bit
        assert table.tensor_type == gguf.GGMLQuantizationType.Q8_0 and np.array_equal(values, trained.table)
    elif gguf_type == "f16":
        assert np.array_equal(values, trained.table.astype(np.float16).astype(np.float32))
    else:
        assert np.array_equal(values, trained.table)
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf").eval()
        with torch.no_grad():
            _assert_same_as_eval_graph(trained, model(torch.from_numpy(trained.batch["input_ids"])).logits.numpy())


def test_gguf_lora_on_the_zero_adapter_gguf_adds_up_to_the_merged_gguf(trained):
    import gguf

    from ortft.export_gguf import export_gguf

    out, manifest = _export(trained, "lora", "--format", "gguf-lora")
    zero_b = {name: (np.zeros_like(value) if ".lora_B." in name else value) for name, value in trained.adapter.items()}
    export_gguf(trained.bundle, trained.manifest, zero_b, trained.root / "gguf-base", "f32")

    def tensors(path):
        return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape([int(n) for n in reversed(t.shape)])
                for t in gguf.GGUFReader(str(path)).tensors}

    merged_dir, _merged_manifest = _export(trained, "gguf-f32", "--format", "gguf", "--gguf-type", "f32")
    lora = tensors(out / "adapter.gguf")
    base, merged = tensors(trained.root / "gguf-base" / "model.gguf"), tensors(merged_dir / "model.gguf")
    alpha, rank = manifest["gguf"]["alpha"], trained.manifest["adapter"]["rank"]
    assert len(lora) == 2 * 14 and np.array_equal(base["token_embd.weight"], trained.table)
    for name in base:
        if f"{name}.lora_a" in lora:  # what llama.cpp computes: W + alpha / r * B A
            np.testing.assert_allclose(base[name] + alpha / rank * lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"], merged[name], rtol=0, atol=1e-5)
        else:
            np.testing.assert_array_equal(base[name], merged[name])


def test_peft_export_on_the_template_base_computes_the_eval_graph(trained):
    from peft import PeftModel

    out, _manifest = _export(trained, "peft", "--format", "peft")
    model = PeftModel.from_pretrained(template_base_model(trained.manifest, trained.model_dir, trained.bundle), str(out)).eval()
    _assert_same_as_eval_graph(trained, torch_logits(model, trained.batch["input_ids"]))


def test_adapter_export_holds_the_trained_tensors(trained):
    from safetensors.numpy import load_file

    out, _manifest = _export(trained, "adapter", "--format", "adapter")
    stored = load_file(str(out / "adapter.safetensors"))
    assert stored.keys() == trained.adapter.keys()
    assert all(np.array_equal(stored[name], value) for name, value in trained.adapter.items())
