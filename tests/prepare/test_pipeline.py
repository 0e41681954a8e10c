"""ortft prepare on tiny random models of every supported architecture: the bundle is right."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ortft.manifest import load_verified
from ortft.runtime import FROZEN_DATA, TrainingSession
from ortft.validate import validate_bundle

from helpers.bundles import prepare_tiny
from helpers.reference import batch_for, randomize_adapters, torch_loss, torch_peft_model

ARCHITECTURES = [
    ("llama", "causal-lm", {}),
    ("mistral", "causal-lm", {}),
    ("qwen2", "causal-lm", {}),
    ("phi3", "causal-lm", {}),
    ("gemma", "causal-lm", {}),
    ("llama", "seq-cls", {"num_labels": 2}),
    ("bert", "seq-cls", {"num_labels": 2}),
    ("llama", "token-cls", {"labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}),
    ("bert", "token-cls", {"labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}),
]


@pytest.mark.parametrize("model_type,task,extra", ARCHITECTURES, ids=[f"{a}-{t}" for a, t, _ in ARCHITECTURES])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_eval_loss_equals_pytorch_peft(tiny_model_factory, tmp_path, model_type, task, extra, dora):
    model_dir = tiny_model_factory(model_type, "seq-cls" if task == "seq-cls" else "causal-lm")
    manifest = prepare_tiny(model_dir, tmp_path / "bundle", task=task, dora=dora, **extra)
    session = TrainingSession(tmp_path / "bundle", threads=1)
    values = randomize_adapters(session, manifest)
    batch = batch_for(manifest)
    outputs = session.evaluate(batch)
    ort_loss = float(np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs))
    reference = torch_loss(torch_peft_model(manifest, model_dir, values), batch)
    assert abs(ort_loss - reference) <= 1e-4 * abs(reference), (ort_loss, reference)


def _closed_form_lora_count(linear_shapes: list[tuple[int, int]], rank: int, dora: bool) -> int:
    return sum(rank * (fan_in + fan_out) + (fan_out if dora else 0) for fan_in, fan_out in linear_shapes)


@pytest.mark.parametrize("dora", [False, True])
def test_trainable_count_matches_closed_form(tiny_llama, tmp_path, dora):
    manifest = prepare_tiny(tiny_llama, tmp_path / "b", rank=8, dora=dora)
    h, inter, kv = 64, 128, 2 * 16  # tiny config: hidden 64, MLP 128, 2 KV heads of 16
    per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    expected = 2 * _closed_form_lora_count(per_layer, 8, dora)
    assert manifest["num_trainable_parameters"] == expected
    assert sum(int(np.prod(e["shape"])) for e in manifest["trainable"]) == expected


def test_layers_adapts_only_the_last_layers(tiny_model_factory, tmp_path):
    model_dir = tiny_model_factory("llama", num_hidden_layers=4)
    manifest = prepare_tiny(model_dir, tmp_path / "b", layers=1, targets="q_proj,v_proj")
    layers = {int(e["module"].split(".layers.")[1].split(".")[0]) for e in manifest["trainable"]}
    assert layers == {3}
    assert {e["module"].rsplit(".", 1)[1] for e in manifest["trainable"]} == {"q_proj", "v_proj"}
    assert manifest["adapter"]["layers"] == [3]


def test_manifest_describes_bundle(tiny_llama, tmp_path):
    manifest = prepare_tiny(tiny_llama, tmp_path / "b")
    assert load_verified(tmp_path / "b")["files"] == manifest["files"]
    for name in ("training_model.onnx", "eval_model.onnx", "initial_adapter.safetensors",
                 "tokenizer/tokenizer.json", "inference_model.onnx", "inference/config.json"):
        assert name in manifest["files"]
    assert not {"inference/model.onnx", "inference/model.onnx.data"} & set(manifest["files"])  # weights stored once
    assert not {"optimizer_model.onnx", "checkpoint"} & set(manifest["files"])
    import onnxruntime

    assert manifest["versions"]["onnxruntime"] == onnxruntime.__version__  # the host's stock onnxruntime
    assert manifest["versions"]["gradient_builder"] == "onnxruntime-training-cpu==1.19.2"
    assert manifest["source"]["weights_sha256"]
    entry = manifest["trainable"][0]
    assert entry["peft_key"] == entry["name"].replace(".default", "")
    assert [i["name"] for i in manifest["graph"]["inputs"]] == ["input_ids", "attention_mask", "position_ids", "labels"]
    assert all(i["dtype"] == "int64" for i in manifest["graph"]["inputs"])
    assert not any(e["name"] in manifest["frozen"] for e in manifest["trainable"])
    assert manifest["graph_patches"]["loss_chunks"] == 8 and manifest["graph_patches"]["loss_chunk_rows"] == 256
    passes = manifest["passes"]  # {stage: {pass: count}}, in the order each stage ran them
    assert list(passes) == ["loss_graph", "training_model.onnx", "eval_model.onnx"]
    assert list(passes["training_model.onnx"])[-3:] == ["LowerTrainingOps", "DelayRecomputation", "PortableOps"]
    assert list(passes["eval_model.onnx"])[-2:] == ["LowerTrainingOps", "PortableOps"]
    assert passes["loss_graph"]["ChunkedCrossEntropy"] == 1
    assert passes["training_model.onnx"]["RecomputeNorms"] == manifest["graph_patches"]["recomputed_norms"] > 0
    assert passes["eval_model.onnx"]["ExternalizeInputs[frozen_weights.data]"] == len(manifest["frozen"])
    assert passes["training_model.onnx"]["LowerTrainingOps"] == sum(
        manifest["graph_patches"]["lowered_training_ops"]["training_model.onnx"].values())


def test_validate_passes_and_detects_tampering(tiny_llama, tmp_path):
    prepare_tiny(tiny_llama, tmp_path / "b")
    report = validate_bundle(tmp_path / "b", threads=1)
    assert report.ok, report.checks
    with open(tmp_path / "b" / "eval_model.onnx", "ab") as handle:
        handle.write(b"x")
    from ortft.errors import BundleError

    with pytest.raises(BundleError, match="eval_model.onnx"):
        validate_bundle(tmp_path / "b", threads=1)


def test_forced_external_data_bundle_trains(tiny_llama, tmp_path):
    manifest = prepare_tiny(tiny_llama, tmp_path / "b", external_data=True)
    report = validate_bundle(tmp_path / "b", threads=1)
    assert report.ok, report.checks
    assert manifest["files"]


def test_adapter_import_matches_peft(tiny_llama, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), attn_implementation="eager")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    manifest = prepare_tiny(tiny_llama, tmp_path / "b", adapter=str(tmp_path / "adapter"))
    assert manifest["adapter"]["rank"] == 4 and manifest["adapter"]["alpha"] == 16
    session = TrainingSession(tmp_path / "b", threads=1)
    batch = batch_for(manifest)
    ort_loss = float(np.asarray(session.evaluate(batch)))
    peft_model.eval()
    assert abs(ort_loss - torch_loss(peft_model, batch)) <= 1e-4 * ort_loss


def test_info_json_round_trips(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from ortft.cli import cli

    prepare_tiny(tiny_llama, tmp_path / "b")
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "trainable" in result.output and "lora r=4" in result.output
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "b"), "--json"])
    assert json.loads(result.output)["format"] == "ortft-bundle"


def test_ort_builds_the_gradient_graph_from_a_weightless_skeleton(tiny_llama, tmp_path, monkeypatch):
    """The graph handed to ORT's generator holds no frozen weight; afterwards the frozen weights are
    initializers of both generated graphs, stored once in frozen_weights.data, and not in the checkpoint."""
    import onnx

    from ortft.prepare import artifacts

    seen = {}
    original = artifacts.run_gradient_builder

    def spy(loss_graph, out_dir, verbose=False):
        graph = onnx.load(str(loss_graph.path)).graph
        seen["initializers"] = {tensor.name for tensor in graph.initializer if tensor.data_type == onnx.TensorProto.FLOAT}
        seen["inputs"] = {value.name for value in graph.input}
        seen["trainable"] = set(loss_graph.trainable)
        return original(loss_graph, out_dir, verbose)

    monkeypatch.setattr(artifacts, "run_gradient_builder", spy)
    manifest = prepare_tiny(tiny_llama, tmp_path / "b")
    assert manifest["frozen"] and seen["initializers"] <= seen["trainable"]
    assert set(manifest["frozen"]) <= seen["inputs"]
    frozen = set(manifest["frozen"])
    store = tmp_path / "b" / FROZEN_DATA
    assert manifest["frozen_weights"] == {"file": FROZEN_DATA, "tensors": len(frozen), "bytes": manifest["frozen_weights"]["bytes"]}
    assert 0 < manifest["frozen_weights"]["bytes"] <= store.stat().st_size
    for file_name in ("training_model.onnx", "eval_model.onnx"):
        graph = onnx.load(str(tmp_path / "b" / file_name), load_external_data=False).graph
        external = {tensor.name: {entry.key: entry.value for entry in tensor.external_data}
                    for tensor in graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL}
        assert frozen <= set(external) and all(external[name]["location"] == FROZEN_DATA for name in frozen)
        assert not frozen & {value.name for value in graph.input}
    session = TrainingSession(tmp_path / "b", threads=1)
    names = set(session.parameter_names())
    assert names == seen["trainable"]  # the initial adapter: the adapters and nothing else
    assert not frozen & set(session.input_names)  # constants of the graph, not user inputs
    # the frozen weights ORT uses are the model's: the bytes in the store equal the PyTorch weights
    model = onnx.load(str(tmp_path / "b" / "training_model.onnx"))  # with its external data
    weights = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer if tensor.name in frozen}
    norm = next(name for name in frozen if name.endswith("layers.0.input_layernorm.weight"))
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).float()
    np.testing.assert_array_equal(weights[norm], reference.model.layers[0].input_layernorm.weight.detach().numpy())
    assert validate_bundle(tmp_path / "b", threads=1).ok


def test_the_tokenizer_json_is_saved_compact_with_the_same_content(tiny_llama, tmp_path):
    """No indentation (SmolLM2's tokenizer.json: 3.5 -> 1.6 MB), the same JSON as transformers saves."""
    from transformers import AutoTokenizer

    from ortft.prepare.pipeline import _save_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    tokenizer.save_pretrained(str(tmp_path / "plain"))
    _save_tokenizer(tokenizer, tmp_path / "bundle")
    plain = (tmp_path / "plain" / "tokenizer.json").read_text(encoding="utf-8")
    compact = (tmp_path / "bundle" / "tokenizer.json").read_text(encoding="utf-8")
    assert "\n" not in compact and len(compact) < 0.8 * len(plain)
    assert json.loads(compact) == json.loads(plain)
