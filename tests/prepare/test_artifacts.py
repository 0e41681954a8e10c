"""prepare's artifacts: standard-ONNX graphs, an initial adapter, and AdamW steps equal to torch.optim.AdamW's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ortft.commands.info import summary_lines
from helpers.bundles import prepare_tiny
from helpers.reference import batch_for, randomize_adapters, torch_peft_model

WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0
LR = 1e-2


@pytest.fixture(scope="module")
def bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw") / "bundle"
    manifest = prepare_tiny(tiny_llama, out, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
    return out, manifest


def test_bundle_holds_standard_graphs_and_an_initial_adapter(bundle):
    """No ORT checkpoint and no optimizer graph; the training graph's inputs are the batch and the
    trainable tensors, its outputs the loss and one gradient per trainable tensor; no training-only op."""
    from safetensors.numpy import load_file

    from ortft.graph.lower_training_ops import training_only_ops

    out, manifest = bundle
    assert not (out / "checkpoint").exists() and not (out / "optimizer_model.onnx").exists()
    assert manifest["format_version"] == 2
    trainable = [entry["name"] for entry in manifest["trainable"]]
    initial = load_file(str(out / "initial_adapter.safetensors"))
    assert sorted([*initial, *manifest["initial_adapter_zeros"]]) == sorted(trainable)  # the zero B matrices are not stored
    graph = onnx.load(str(out / "training_model.onnx"), load_external_data=False)
    inputs = [value.name for value in graph.graph.input]
    outputs = [value.name for value in graph.graph.output]
    assert inputs == ["input_ids", "attention_mask", "position_ids", "labels", *trainable]
    assert outputs == ["loss", *[name + "_grad" for name in trainable]]
    assert not training_only_ops(graph)
    assert manifest["optimizer"]["update"] == "torch.optim.AdamW"
    assert manifest["optimizer"]["weight_decay"] == pytest.approx(WEIGHT_DECAY)
    assert any(line.startswith("optimizer    AdamW (torch.optim.AdamW update)") for line in summary_lines(manifest))


def test_adapters_after_several_steps_match_torch_adamw(bundle, tiny_llama):
    """Same start, batch and settings: ortft's steps on stock onnxruntime and PyTorch's give the same
    losses and adapter weights (weight decay and clipping included)."""
    import torch

    from ortft.runtime import TrainingSession

    out, manifest = bundle
    session = TrainingSession(out, threads=1)
    values = randomize_adapters(session, manifest)
    batch = batch_for(manifest)
    model = torch_peft_model(manifest, tiny_llama, values)
    model.train()
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=tuple(manifest["optimizer"]["betas"]),
                                  eps=manifest["optimizer"]["eps"], weight_decay=WEIGHT_DECAY)
    inputs = {name: torch.from_numpy(value) for name, value in batch.items()}
    for _ in range(4):
        ours = float(np.asarray(session.train_step_forward_backward(batch)))
        session.optimizer_step(LR)
        theirs = model(**inputs).loss
        theirs.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert ours == pytest.approx(theirs.item(), rel=1e-5)
    named = dict(model.named_parameters())
    for name in values:
        expected = named[name].detach().numpy()
        assert not np.allclose(expected, values[name], atol=1e-4), f"{name} did not move"
        np.testing.assert_allclose(session.parameter(name), expected, rtol=1e-4, atol=LR * 1e-3, err_msg=name)
