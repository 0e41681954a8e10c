"""Rewrite activations whose exported pattern ORT's gradient builder mishandles, without changing maths.

The tanh approximation of GELU, 0.5 x (1 + tanh z) with z = sqrt(2/pi) (x + 0.044715 x^3), exports
to a pattern that ORT 1.19's training graph transformers break ("Argument mismatch when removing
edge", seen with Gemma). The identical function x * sigmoid(2 z) exports to a pattern ORT handles.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch


class SigmoidFormGELUTanh(torch.nn.Module):
    """gelu_tanh(x) = 0.5 x (1 + tanh z) = x * sigmoid(2 z), since 0.5 (1 + tanh z) = sigmoid(2 z)."""

    coefficient = 2.0 * math.sqrt(2.0 / math.pi)

    def forward(self, x):
        return x * torch.sigmoid(self.coefficient * (x + 0.044715 * x * x * x))


def _is_tanh_gelu(module) -> bool:
    name = type(module).__name__
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh"):
        return True
    return isinstance(module, torch.nn.GELU) and getattr(module, "approximate", "none") == "tanh"


@contextlib.contextmanager
def export_friendly_activations(model: torch.nn.Module) -> Iterator[int]:
    """Swap tanh-GELU modules for SigmoidFormGELUTanh during the block; yields how many were swapped."""
    swapped = []
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if _is_tanh_gelu(child):
                setattr(parent, child_name, SigmoidFormGELUTanh())
                swapped.append((parent, child_name, child))
    try:
        yield len(swapped)
    finally:
        for parent, child_name, child in swapped:
            setattr(parent, child_name, child)
