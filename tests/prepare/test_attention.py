"""The cheaper export form of Llama-style attention computes what transformers' eager attention does."""

from __future__ import annotations

import collections
import contextlib
import importlib
import types

import numpy as np
import pytest
import torch

from ortft.prepare import attention

LLAMA = "transformers.models.llama.modeling_llama"


def _reference(name: str):
    return getattr(importlib.import_module(LLAMA), name)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (4, 4)])
def test_flipped_rotary_embedding_equals_rotate_half(heads, kv_heads):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 7, 16, generator=generator)
    k = torch.randn(2, kv_heads, 7, 16, generator=generator)
    angles = torch.randn(2, 7, 16, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    expected = _reference("apply_rotary_pos_emb")(q, k, cos, sin)
    got = attention.apply_rotary_pos_emb_flipped(q, k, cos, sin)
    for want, have in zip(expected, got):
        assert torch.equal(want, have)  # the sign moves from x2 to sin: bit-identical


@pytest.mark.parametrize("heads,kv_heads,key_length", [(4, 2, 6), (9, 3, 6), (4, 4, 6), (6, 2, 9)])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_attention_equals_repeated_keys(heads, kv_heads, key_length, masked):
    generator = torch.Generator().manual_seed(1)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    query = torch.randn(2, heads, 6, 8, generator=generator)
    key = torch.randn(2, kv_heads, key_length, 8, generator=generator)
    value = torch.randn(2, kv_heads, key_length, 8, generator=generator)
    mask = None
    if masked:  # causal and padded, additive, as transformers builds it for eager attention; one column too many
        allowed = torch.ones(2, 1, 6, key_length + 1, dtype=torch.bool).tril(key_length - 6)
        allowed[1, :, :, :2] = False
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    expected_output, expected_weights = _reference("eager_attention_forward")(module, query, key, value, mask, 0.125)
    output, weights = attention.grouped_eager_attention_forward(module, query, key, value, mask, 0.125)
    torch.testing.assert_close(output, expected_output, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-7)


def test_a_per_head_mask_falls_back_to_repeated_keys():
    generator = torch.Generator().manual_seed(2)
    module = types.SimpleNamespace(num_key_value_groups=2, training=False)
    query, key, value = (torch.randn(1, h, 5, 8, generator=generator) for h in (4, 2, 2))
    mask = torch.randn(1, 4, 5, 5, generator=generator)
    expected = _reference("eager_attention_forward")(module, query, key, value, mask, 0.3)
    got = attention.grouped_eager_attention_forward(module, query, key, value, mask, 0.3)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)


def test_only_modules_with_llamas_source_are_patched_and_all_are_restored(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    phi3 = importlib.import_module("transformers.models.phi3.modeling_phi3")
    llama = importlib.import_module(LLAMA)
    originals = {name: getattr(llama, name) for name in ("apply_rotary_pos_emb", "eager_attention_forward")}
    phi3_rotary = phi3.apply_rotary_pos_emb  # partial rotary: a different function, left alone
    for model_type, expected in (("llama", 2), ("phi3", 1)):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(model_type)), attn_implementation="eager")
        with attention.export_friendly_attention(model) as replaced:
            assert replaced == expected
            assert llama.eager_attention_forward is attention.grouped_eager_attention_forward or model_type != "llama"
            assert phi3.apply_rotary_pos_emb is phi3_rotary
    assert {name: getattr(llama, name) for name in originals} == originals
    assert phi3.apply_rotary_pos_emb is phi3_rotary


def _op_counts(bundle) -> collections.Counter:
    import onnx

    model = onnx.load(str(bundle / "training_model.onnx"), load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)


def test_a_bundle_with_cheaper_attention_trains_exactly_like_one_without(tiny_llama, tmp_path, monkeypatch):
    """Same losses and the same adapter weights after three steps; fewer nodes, and none of the
    BroadcastGradientArgs that an unknown shape would make the gradient builder add."""
    from ortft.prepare import onnx_export
    from ortft.runtime import TrainingSession

    from helpers.bundles import prepare_tiny
    from helpers.reference import assert_trains_alike, batch_for

    # The full [seq, seq] attention (no chunks: tests/prepare/test_blocked_attention.py tests those).
    cheaper = prepare_tiny(tiny_llama, tmp_path / "cheaper", attention_chunk_rows=0)
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "export_friendly_attention", lambda model: contextlib.nullcontext(0))
        plain = prepare_tiny(tiny_llama, tmp_path / "plain", attention_chunk_rows=0)
    assert cheaper["graph_patches"]["attention_functions_replaced"] == 2
    assert plain["graph_patches"]["attention_functions_replaced"] == 0
    plain_ops, cheaper_ops = _op_counts(tmp_path / "plain"), _op_counts(tmp_path / "cheaper")
    layers = plain["model"]["num_layers"]
    assert plain_ops["Expand"] - cheaper_ops["Expand"] == 2 * layers  # no repeat_kv for keys and values
    assert plain_ops["Neg"] - cheaper_ops["Neg"] == 4 * layers  # rotate_half's Neg for q and k, and its gradient
    assert cheaper_ops["BroadcastGradientArgs"] == 0
    batch = batch_for(plain)
    sessions = [TrainingSession(tmp_path / name, threads=1) for name in ("plain", "cheaper")]
    losses = assert_trains_alike(sessions, batch, steps=3, rel=1e-6, rtol=1e-5, atol=1e-7)
    assert np.isfinite(losses).all()
