"""Weights as quantized checkpoints hold them, for tests of lossless quantization."""

from __future__ import annotations

import numpy as np


def q8_0_values(shape, axis=1, seed=0) -> np.ndarray:
    """What a GGUF Q8_0 tensor dequantizes to: int8 (the largest +-127) x a float16 scale per 32-block along `axis`."""
    rng = np.random.default_rng(seed)
    moved = list(shape)
    moved[axis], moved[-1] = moved[-1], moved[axis]
    blocks = rng.standard_normal(tuple(moved[:-1]) + (moved[-1] // 32, 32)).astype(np.float32)
    scale = (np.abs(blocks).max(-1) / 127 * 0.02).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(blocks / np.abs(blocks).max(-1, keepdims=True) * 127), -127, 127)
    values = (q.astype(np.int8).astype(np.float32) * scale[..., None]).reshape(moved)  # an integer 0: +0.0
    return np.ascontiguousarray(np.swapaxes(values, axis, -1))
