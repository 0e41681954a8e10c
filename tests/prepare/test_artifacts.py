"""The bundle's optimizer graph: AdamW updates the adapters exactly as torch.optim.AdamW does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ortft.commands.info import summary_lines
from prepare.helpers import batch_for, prepare_tiny, randomize_adapters, torch_peft_model

WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0
LR = 1e-2


@pytest.fixture(scope="module")
def bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw") / "bundle"
    manifest = prepare_tiny(tiny_llama, out, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
    return out, manifest


def test_optimizer_graph_uses_pytorch_adamw_update(bundle):
    out, manifest = bundle
    graph = onnx.load(str(out / "optimizer_model.onnx"))
    adamw = [node for node in graph.graph.node if node.op_type == "AdamWOptimizer"]
    assert len(adamw) == 1
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in adamw[0].attribute}
    assert attributes["adam_mode"] == 0 and attributes["correct_bias"] == 1
    assert attributes["weight_decay"] == pytest.approx(WEIGHT_DECAY)
    assert manifest["optimizer"]["update"] == "torch.optim.AdamW"
    assert any(line.startswith("optimizer    AdamW (torch.optim.AdamW update)") for line in summary_lines(manifest))


def test_adapters_after_several_steps_match_torch_adamw(bundle, tiny_llama):
    """Same start, batch and settings: ORT's steps and PyTorch's give the same adapter weights.

    The gradients of the first step are small for many A entries (B is small), where the update
    of onnxblock's default mode (eps added before the second moment's bias correction) moves them
    visibly less than PyTorch's.
    """
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
