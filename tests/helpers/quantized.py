"""Weights as quantized checkpoints hold them, for tests of lossless quantization (and exports of such bundles)."""

from __future__ import annotations

from pathlib import Path

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


def with_q8_0_embeddings(model_dir: Path, out: Path) -> Path:
    """A copy of the Hugging Face folder `model_dir` at `out` whose embedding table holds what a GGUF Q8_0 table
    dequantizes to (prepare --quantize then stores it as exact int8: `quantization.embeddings == "int8-exact"`)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(model_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    name = next(key for key in tensors if key.endswith("embed_tokens.weight"))
    tensors[name] = q8_0_values(tensors[name].shape, axis=1)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
