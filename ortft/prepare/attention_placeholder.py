"""Export causal attention as one placeholder node that ortft's graph pass replaces by chunked attention.

The training graph's attention is rewritten after ORT's gradient builder has run (ortft/graph/
blocked_attention.py): query-chunked, with a backward pass that recomputes each chunk's probabilities, so
no [seq, seq] tensor is kept from the forward pass to the backward pass, or built at all. For that the
export writes each layer's attention core (softmax(q k^T * scaling + mask) v, with the causal mask, the
padding mask and a sliding window) as one `org.pytorch.aten::ATen` node with operator
`ortft_causal_attention`, which ORT's builder knows (the training build has the ATen schema) and
differentiates with the gradient definition ortft registers (blocked_attention.gradient_definitions()).

The placeholder takes the [batch, seq] padding mask, not transformers' 4-D mask: a forward pre-hook on
the decoder keeps the `attention_mask` it is called with, and the 4-D mask, read by nothing any more,
leaves the traced graph. Calls the placeholder cannot express keep the grouped eager attention
(ortft/prepare/attention.py): attention dropout in training mode, keys longer than the queries (a KV
cache), a per-head mask, or no padding mask at hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..graph.blocked_attention import ATEN_DOMAIN, FORWARD_OPERATOR
from . import attention


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T * scaling + causal/padding/window mask) v for grouped heads, out [b, seq, heads, d].

    `forward` computes it (the tracer needs real shapes); `symbolic` writes the placeholder node.
    """

    @staticmethod
    def forward(ctx, query, key, value, padding_mask, scaling: float, window: int, groups: int):
        length = query.shape[2]
        rows = torch.arange(length).unsqueeze(1)
        columns = torch.arange(length).unsqueeze(0)
        allowed = (columns <= rows) & (columns > rows - window if window else torch.ones_like(rows, dtype=torch.bool))
        allowed = allowed.unsqueeze(0).unsqueeze(0) & padding_mask.bool()[:, None, None, :]
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min).to(query.dtype)
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
        weights = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling + mask, dim=-1)
        return torch.matmul(weights, value).transpose(1, 2).contiguous()

    @staticmethod
    def symbolic(g, query, key, value, padding_mask, scaling: float, window: int, groups: int):
        constants = [g.op("Constant", value_t=torch.tensor(scaling, dtype=torch.float32)),
                     g.op("Constant", value_t=torch.tensor(window, dtype=torch.int64)),
                     g.op("Constant", value_t=torch.tensor(groups, dtype=torch.int64))]
        output = g.op(f"{ATEN_DOMAIN}::ATen", query, key, value, padding_mask, *constants, operator_s=FORWARD_OPERATOR)
        query_type = query.type()
        sizes = query_type.varyingSizes() if hasattr(query_type, "varyingSizes") else None
        if sizes and len(sizes) == 4:
            batch, heads, length, head_dim = sizes
            output.setType(query_type.with_sizes([batch, length, heads, head_dim]))
        else:
            output.setType(query_type)
        return output


class _PaddingMask:
    """Holds the [batch, seq] attention_mask the decoder was last called with (a forward pre-hook)."""

    def __init__(self):
        self.value = None

    def __call__(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.value = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _placeholder_attention_forward(padding: _PaddingMask, fallback):
    """An eager_attention_forward that writes the placeholder when it can, `fallback` otherwise."""

    def forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = int(getattr(module, "num_key_value_groups", 1) or 1)
        mask = padding.value
        expressible = (mask is not None and not (dropout and module.training) and key.shape[-2] == query.shape[-2]
                       and (attention_mask is None or attention_mask.shape[1] == 1)
                       and int(query.shape[1]) == groups * int(key.shape[1]))
        if not expressible:
            return fallback(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)
        window = int(kwargs.get("sliding_window") or 0)
        output = _CausalAttention.apply(query, key, value, mask, float(scaling), window, groups)
        return output, None

    return forward


@contextlib.contextmanager
def placeholder_attention(model: torch.nn.Module) -> Iterator[int]:
    """Inside `attention.export_friendly_attention(model)`: write each Llama-style attention call of
    `model` as the placeholder. Yields how many modeling modules were patched; restores them afterwards."""
    decoder = getattr(model, "base_model", model)
    padding = _PaddingMask()
    hook = decoder.register_forward_pre_hook(padding, with_kwargs=True)
    patched = []
    for module in attention._modeling_modules(model):
        current = getattr(module, "eager_attention_forward", None)
        if current is attention.grouped_eager_attention_forward:
            patched.append(module)
            module.eager_attention_forward = _placeholder_attention_forward(padding, current)
    try:
        yield len(patched)
    finally:
        hook.remove()
        for module in patched:
            module.eager_attention_forward = attention.grouped_eager_attention_forward

