"""Export Llama-style attention in a form that costs ORT fewer passes, without changing its maths.

transformers' eager attention, traced as it is, gives the training graph work that the maths does not
need (SmolLM2-135M, 1000-token chat batches: the attention ops took 0.45 s of a ~3.9 s step, 0.36 s
after this; peak RSS ~115 MB lower):

- Rotary embeddings: `rotate_half(x) = cat(-x2, x1)` exports as two Slices, a Neg and a Concat per
  tensor, and their gradients as two zero-filled SliceGrads, a Neg, a Split and a three-way Sum. The
  same function is `flip(x) * sign`, where `flip` swaps the two halves (one Slice with step -1 over a
  [2, d/2] view) and `sign` is -1 on the first half: `rotate_half(x) * sin = flip(x) * (sin * sign)`,
  and `sin * sign` is a [batch, 1, seq, d] tensor computed once per layer.
- Grouped-query attention: `repeat_kv` expands keys and values to every query head (an Expand each,
  a ReduceSum each in the backward pass, and the expanded copies kept for it). Folding the query
  heads that share a key head into the row axis, [b, kv, rep * s, d] @ [b, kv, d, s_k], computes the
  same scores with the keys and values as they are.

Only modeling modules whose `apply_rotary_pos_emb` / `eager_attention_forward` have exactly the source
of Llama's are patched (transformers 4.57: both in llama, mistral, qwen2 and gemma, the attention only
in phi3, whose rotary embedding is partial); anything else exports unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Iterator

import torch

REFERENCE_MODULE = "transformers.models.llama.modeling_llama"


def apply_rotary_pos_emb_flipped(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Llama's apply_rotary_pos_emb with rotate_half written as a half swap and a sign folded into sin."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    half = int(q.shape[-1]) // 2  # the head size: a constant of the model
    sign = torch.tensor([-1.0] * half + [1.0] * half, dtype=sin.dtype)
    signed_sin = sin * sign
    return q * cos + _swap_halves(q) * signed_sin, k * cos + _swap_halves(k) * signed_sin


def _swap_halves(x):
    """cat(x2, x1) for x = cat(x1, x2) along the last axis, as one reversed slice of a [2, d/2] view.

    `reshape_as` keeps the result's shape known to ONNX shape inference; with unflatten/flatten ORT's
    gradient builder lost it and added a BroadcastGradientArgs and a ReduceSum to every Mul and Add
    of the attention block.
    """
    half = int(x.shape[-1]) // 2
    return x.reshape(-1, 2, half).flip(1).reshape_as(x)


def grouped_eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Llama's eager_attention_forward without repeat_kv: each key head serves its query group at once."""
    groups = module.num_key_value_groups
    if attention_mask is not None and attention_mask.shape[1] != 1:  # a per-head mask: expand the keys
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
        groups = 1
    batch, heads, length, head_dim = query.shape
    kv_heads, key_length = key.shape[1], key.shape[-2]
    grouped_query = query.reshape(batch, kv_heads, groups * length, head_dim)
    scores = torch.matmul(grouped_query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :key_length].unsqueeze(2)
        scores = (scores.reshape(batch, kv_heads, groups, length, key_length) + mask).reshape(
            batch, kv_heads, groups * length, key_length)
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).reshape(batch, heads, length, head_dim)
    return output.transpose(1, 2).contiguous(), weights.reshape(batch, heads, length, key_length)


_REPLACEMENTS = {
    "apply_rotary_pos_emb": apply_rotary_pos_emb_flipped,
    "eager_attention_forward": grouped_eager_attention_forward,
}


def _reference_sources() -> dict[str, str]:
    """Source of each replaced function as Llama's modeling module defines it."""
    import importlib

    reference = importlib.import_module(REFERENCE_MODULE)
    return {name: _source(getattr(reference, name, None)) for name in _REPLACEMENTS}


def _source(function) -> str | None:
    try:
        return inspect.getsource(function) if function is not None else None
    except (OSError, TypeError):
        return None


def _modeling_modules(model: torch.nn.Module) -> set:
    """The transformers modeling modules that define the classes of `model`'s submodules."""
    names = {type(sub).__module__ for sub in model.modules()}
    return {sys.modules[name] for name in names if name.startswith("transformers.models.") and name in sys.modules}


@contextlib.contextmanager
def export_friendly_attention(model: torch.nn.Module) -> Iterator[int]:
    """Patch Llama-identical attention helpers of `model`'s modeling modules during the block.

    Yields how many functions were replaced; restores the originals afterwards.
    """
    references = _reference_sources()
    replaced = []
    for module in _modeling_modules(model):
        for name, replacement in _REPLACEMENTS.items():
            if references[name] is not None and _source(getattr(module, name, None)) == references[name]:
                replaced.append((module, name, getattr(module, name)))
                setattr(module, name, replacement)
    try:
        yield len(replaced)
    finally:
        for module, name, original in replaced:
            setattr(module, name, original)
