"""Give the backward pass its own DequantizeLinear, so no layer's float32 weight lives from forward to backward.

In a training graph the dequantized weight of `MatMul(x, DQ(W))` is read twice: by the forward MatMul
and by the gradient MatMul that computes dL/dx. One shared DequantizeLinear output therefore stays
alive from the forward pass until the backward pass reaches that layer, so all layers' float32 copies
coexist at the peak. This pass clones each such DequantizeLinear for the backward consumers (same
quantized inputs, new output), so the forward copy dies after its MatMul and the backward copy is made
just before it is needed: the weight is dequantized twice per step, a compute-for-memory trade.
The cloning and where clones sit (it matters for ORT's execution order) are in ortft/graph/recompute.py.
"""

from __future__ import annotations

from .recompute import RecomputeForBackward


class RecomputeDequantize(RecomputeForBackward):
    def __init__(self, prefix: str | None = None):
        self.prefix = prefix  # only DequantizeLinear nodes whose name starts with it (None: all)
        super().__init__(lambda node: node.op_type == "DequantizeLinear" and (not self.prefix or node.name.startswith(self.prefix)))
