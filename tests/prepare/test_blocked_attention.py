"""Bundles with chunked attention (ortft/graph/blocked_attention.py) train exactly like bundles with the
full [seq, seq] attention (relative 1e-5) and like PyTorch + PEFT (1e-4), on every causal architecture,
with padding, packed rows and --batch-tokens batches, in the training and the eval graph."""

from __future__ import annotations

import collections
import itertools
import json

import numpy as np
import onnx
import pytest

from ortft.runtime import TrainingSession

from helpers.bundles import prepare_tiny
from helpers.reference import batch_for, randomize_adapters, torch_peft_model

CAUSAL = ["llama", "mistral", "qwen2", "phi3", "gemma"]
CHUNK_ROWS = 4  # several chunks even in a 12-token batch
TEXTS = ["The capital of France is Paris.", "hello world", "Answer: 42. (six times seven) " * 3,
         "The capital of France is Paris. hello world " * 4, "six", "Answer: 42.", "hello " * 9,
         "The capital of France is Paris. Answer: 42. hello world six times seven " * 2]


@pytest.fixture(scope="module")
def bundles(tiny_model_factory, tmp_path_factory):
    """make(model_type, **config overrides) -> (model_dir, {"blocked": (path, manifest), "full": (path, manifest)})."""
    cache = {}

    def make(model_type: str, **overrides):
        key = (model_type, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            model_dir = tiny_model_factory(model_type, **overrides)
            root = tmp_path_factory.mktemp(f"attention-{model_type}")
            made = {}
            for name, rows in (("blocked", CHUNK_ROWS), ("full", 0)):
                made[name] = (root / name, prepare_tiny(model_dir, root / name, attention_chunk_rows=rows))
            cache[key] = (model_dir, made)
        return cache[key]

    return make


def _loss_and_gradients(bundle, manifest: dict, batch: dict, seed: int = 2) -> tuple[float, dict, dict]:
    session = TrainingSession(bundle, threads=1)
    values = randomize_adapters(session, manifest, seed=seed)
    outputs = session.train_step_forward_backward(batch)  # seq-cls: [loss, logits]
    loss = float(np.asarray(outputs[0] if isinstance(outputs, list) else outputs))
    return loss, session.gradients(), values


def _torch_loss_and_gradients(manifest: dict, model_dir, values: dict, batch: dict) -> tuple[float, dict]:
    import torch

    model = torch_peft_model(manifest, model_dir, values)
    output = model(**{name: torch.from_numpy(value) for name, value in batch.items()})
    output.loss.backward()
    gradients = {name: param.grad.numpy() for name, param in model.named_parameters() if param.requires_grad}
    return float(output.loss.detach()), gradients


def assert_same(loss: float, gradients: dict, want_loss: float, want_gradients: dict, rel: float) -> None:
    assert abs(loss - want_loss) <= rel * abs(want_loss), (loss, want_loss)
    assert set(gradients) == set(want_gradients)
    for name, want in want_gradients.items():
        error = np.linalg.norm(gradients[name] - want) / max(np.linalg.norm(want), 1e-12)
        assert error <= rel, f"{name}: relative L2 error {error:.2e}"


def _data_batches(bundle, **settings) -> list[dict]:
    """Batches made by ortft's own loader from TEXTS (packed rows or length-grouped batches)."""
    import tempfile
    from pathlib import Path

    from ortft.data import BatchIterator, DataConfig, load_dataset
    from ortft.tokenizer import load_tokenizer

    config = DataConfig(seed=0, **settings)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "texts.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS), encoding="utf-8")
        dataset = load_dataset(path, load_tokenizer(bundle / "tokenizer"), config)
        iterator = BatchIterator(dataset, config)
        epoch = itertools.islice(iterator.batches(), iterator.batches_per_epoch)  # batches() never ends
        return [{name: np.ascontiguousarray(value) for name, value in batch.inputs.items()} for batch, _position in epoch]


@pytest.mark.parametrize("model_type", CAUSAL)
def test_losses_and_gradients_equal_the_full_attention_and_peft(bundles, model_type):
    model_dir, made = bundles(model_type)
    (blocked, manifest), (full, full_manifest) = made["blocked"], made["full"]
    layers = manifest["model"]["num_layers"]
    assert manifest["graph_patches"]["blocked_attention"] == layers
    assert manifest["graph_patches"]["attention_chunk_rows"] == CHUNK_ROWS
    assert full_manifest["graph_patches"]["blocked_attention"] == 0
    for graph_file, loops in (("training_model.onnx", 2 * layers), ("eval_model.onnx", layers)):
        ops = collections.Counter(node.op_type for node in onnx.load(str(blocked / graph_file), load_external_data=False).graph.node)
        assert ops["Loop"] == loops and ops["Softmax"] == 0 and ops["ATen"] == 0, (graph_file, ops)
    for seq, rows in ((12, 2), (23, 3)):  # right padding on the last row; 23 rows: chunks of 4 and a short one
        batch = batch_for(manifest, batch=rows, seq=seq)
        loss, gradients, values = _loss_and_gradients(blocked, manifest, batch)
        full_loss, full_gradients, _ = _loss_and_gradients(full, full_manifest, batch)
        assert_same(loss, gradients, full_loss, full_gradients, rel=1e-5)
        torch_loss, torch_gradients = _torch_loss_and_gradients(manifest, model_dir, values, batch)
        assert_same(loss, gradients, torch_loss, torch_gradients, rel=1e-4)
        evaluated = [float(np.asarray(TrainingSession(path, threads=1).evaluate(batch))) for path in (blocked, full)]
        assert evaluated[0] == pytest.approx(evaluated[1], rel=1e-5)


@pytest.mark.parametrize("settings", [{"pack": True, "seq_len": 32, "batch_size": 2},
                                      {"batch_tokens": 64, "seq_len": 32, "batch_size": 1},
                                      {"seq_len": 32, "batch_size": 3}], ids=["packed", "batch-tokens", "padded"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_loader_batches_equal_the_full_attention_and_peft(bundles, model_type, settings):
    model_dir, made = bundles(model_type)
    (blocked, manifest), (full, full_manifest) = made["blocked"], made["full"]
    batches = _data_batches(blocked, **settings)
    assert len(batches) >= 2
    if settings.get("pack"):  # rows in which a second example starts (attends to the first: no block mask)
        batches = [batch for batch in batches if (batch["position_ids"][:, 1:] == 0).any()]
        assert batches
    for batch in batches[:3]:
        loss, gradients, values = _loss_and_gradients(blocked, manifest, batch)
        full_loss, full_gradients, _ = _loss_and_gradients(full, full_manifest, batch)
        assert_same(loss, gradients, full_loss, full_gradients, rel=1e-5)
        torch_loss, torch_gradients = _torch_loss_and_gradients(manifest, model_dir, values, batch)
        assert_same(loss, gradients, torch_loss, torch_gradients, rel=1e-4)


def test_sliding_window_shorter_than_the_rows(bundles):
    """Mistral with a 5-token window: keys more than 4 positions back are masked, in chunks of 4 rows."""
    model_dir, made = bundles("mistral", sliding_window=5)
    (blocked, manifest), (full, full_manifest) = made["blocked"], made["full"]
    batch = batch_for(manifest, batch=2, seq=21)
    loss, gradients, values = _loss_and_gradients(blocked, manifest, batch)
    full_loss, full_gradients, _ = _loss_and_gradients(full, full_manifest, batch)
    assert_same(loss, gradients, full_loss, full_gradients, rel=1e-5)
    torch_loss, torch_gradients = _torch_loss_and_gradients(manifest, model_dir, values, batch)
    assert_same(loss, gradients, torch_loss, torch_gradients, rel=1e-4)


@pytest.mark.parametrize("overrides", [{"layers": 1, "targets": "q_proj,v_proj"}, {"task": "seq-cls", "num_labels": 2}],
                         ids=["last-layer-q-v", "seq-cls"])
def test_partial_adapters_and_sequence_classification(tiny_model_factory, tmp_path, overrides):
    """A layer without adapters below the adapted one needs no backward; an adapted layer whose keys need
    no gradient computes none; a classifier's loss graph gets the same attention."""
    task = overrides.get("task", "causal-lm")
    model_dir = tiny_model_factory("llama", task)
    blocked = prepare_tiny(model_dir, tmp_path / "blocked", attention_chunk_rows=CHUNK_ROWS, **overrides)
    full = prepare_tiny(model_dir, tmp_path / "full", attention_chunk_rows=0, **overrides)
    assert blocked["graph_patches"]["blocked_attention"] == blocked["model"]["num_layers"]
    batch = batch_for(blocked, batch=2, seq=14)
    loss, gradients, values = _loss_and_gradients(tmp_path / "blocked", blocked, batch)
    full_loss, full_gradients, _ = _loss_and_gradients(tmp_path / "full", full, batch)
    assert_same(loss, gradients, full_loss, full_gradients, rel=1e-5)
    torch_loss, torch_gradients = _torch_loss_and_gradients(blocked, model_dir, values, batch)
    assert_same(loss, gradients, torch_loss, torch_gradients, rel=1e-4)
