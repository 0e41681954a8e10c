"""`RecomputeActivations`: a SwiGLU MLP's cheap activations computed again for the backward pass.

act(gate) and act * up are elementwise results of tensors the backward keeps anyway, so a clone made just
before the backward reads them costs one elementwise pass and saves two [tokens, intermediate] tensors
per layer at the peak. The cloning and where clones sit are in ortft/graph/recompute.py.
"""

from __future__ import annotations

from .recompute import RecomputeForBackward

ACTIVATION_OPS = frozenset({"QuickGelu", "Gelu", "FastGelu", "Sigmoid", "Tanh", "Relu", "Mul"})
BLOCKED_ATTENTION_PREFIX = "ortft_attention"  # ortft/graph/blocked_attention.py names its nodes so


class RecomputeActivations(RecomputeForBackward):
    """Recompute cheap elementwise forward results (ACTIVATION_OPS) whose inputs the backward keeps anyway."""

    def __init__(self, ops=ACTIVATION_OPS):
        # the blocked attention's own nodes are left alone: their Muls are index arithmetic on scalars
        super().__init__(lambda node: node.op_type in ops and node.domain in ("", "com.microsoft")
                         and not node.name.startswith(BLOCKED_ATTENTION_PREFIX))
