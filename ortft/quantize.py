"""Weight quantization maths (numpy only; host and device): int8 per channel, int4 blocked, error stats.

Every scheme is round-to-nearest and matches ONNX DequantizeLinear: `w ~ (q - zero_point) * scale`.
The quantized "group" (one scale, and for asymmetric int4 one zero point) runs along `axis`:
- int8: symmetric, one scale per slice across `axis` (per output channel when `axis` is the input
  dimension), q in [-127, 127]; DequantizeLinear(axis=1 - axis) with a 1-D scale (opset 13).
- int4: blocks of `block_size` consecutive values along `axis`; symmetric (q in [-7, 7], no zero
  point) or asymmetric (uint4 q in [0, 15] with a uint4 zero point per block); DequantizeLinear with
  `axis` and `block_size` (opset 21). int4 values pack two to a byte, low nibble first (ONNX's layout).
- int8, exact (`quantize_int8_exact`): symmetric int8 in blocks along `axis` (opset 21), only for a weight
  whose float32 values are exactly q x scale (a GGUF Q8_0 tensor dequantized): lossless, else None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import INT4_BLOCK_SIZE

SCHEMES = ("int8", "int4")
Q8_0_BLOCK_SIZE = 32  # GGUF Q8_0: int8 values per float16 scale, the block an exact int8 table is found in
MAX_OFF_SCALE_BLOCKS = 64  # quantize_int8_exact: blocks whose largest value is not +-127 x the scale, at least


@dataclass
class QuantizedWeight:
    """A 2-D weight in quantized form; `dequantize()` gives the float32 tensor DequantizeLinear computes."""

    scheme: str  # "int8" | "int4"
    q: np.ndarray  # int8 (int8, symmetric int4) or uint8 (asymmetric int4), unpacked, same shape as the weight
    scale: np.ndarray  # float32: [n] for int8 (n = size of the other axis), blocks-shaped for int4
    zero_point: np.ndarray | None  # uint8, shape of scale (asymmetric int4), else None
    axis: int  # the axis the groups run along (the weight's input dimension)
    block_size: int | None  # int4, and int8 in blocks (exact); None: int8 per channel
    shape: tuple = field(default=())

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self) -> np.ndarray:
        if self.block_size is None:
            scale = np.expand_dims(self.scale, self.axis)
            return self.q.astype(np.float32) * scale
        scale = _expand_blocks(self.scale, self.axis, self.block_size, self.q.shape[self.axis])
        q = self.q.astype(np.float32)
        if self.zero_point is not None:
            q = q - _expand_blocks(self.zero_point, self.axis, self.block_size, self.q.shape[self.axis]).astype(np.float32)
        return q * scale

    def nbytes(self) -> int:
        """Bytes as stored in the graph: packed values + scales (+ zero points)."""
        bits = 8 if self.scheme == "int8" else 4
        total = (self.q.size * bits + 7) // 8 + self.scale.size * self.scale.itemsize
        if self.zero_point is not None:
            total += (self.zero_point.size * bits + 7) // 8
        return int(total)

    def columns(self, start: int, stop: int) -> "QuantizedWeight":
        """Output columns [start, stop) of an [in, out] weight (axis 0): exactly what quantizing them alone gives.

        Scales (and zero points) run along the input axis, one per output column and block, so a
        column slice of every array is the quantization of the column slice of the weight.
        """
        if self.axis != 0:
            raise ValueError("column slices need the groups along axis 0 (an [in, out] weight)")
        zero_point = None if self.zero_point is None else np.ascontiguousarray(self.zero_point[..., start:stop])
        return QuantizedWeight(self.scheme, np.ascontiguousarray(self.q[:, start:stop]),
                               np.ascontiguousarray(self.scale[..., start:stop]), zero_point, 0, self.block_size,
                               (self.shape[0], stop - start) if self.shape else ())


def _expand_blocks(values: np.ndarray, axis: int, block_size: int, length: int) -> np.ndarray:
    return np.repeat(values, block_size, axis=axis).take(np.arange(length), axis=axis)


def _blocked(weight: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """View `weight` as [..., blocks, block_size] along `axis` (zero-padded at the end), axis moved last."""
    moved = np.moveaxis(weight, axis, -1)
    length = moved.shape[-1]
    blocks = -(-length // block_size)
    pad = blocks * block_size - length
    if pad:
        moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), moved.dtype)], axis=-1)
    return moved.reshape(moved.shape[:-1] + (blocks, block_size))


def quantize_int8(weight: np.ndarray, axis: int) -> QuantizedWeight:
    """Symmetric int8 with one scale per slice across `axis` (absmax / 127)."""
    weight = np.asarray(weight, dtype=np.float32)
    absmax = np.abs(weight).max(axis=axis)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / np.expand_dims(scale, axis)), -127, 127).astype(np.int8)
    return QuantizedWeight("int8", q, scale, None, axis, None, tuple(weight.shape))


def quantize_int4(weight: np.ndarray, axis: int, block_size: int = INT4_BLOCK_SIZE, symmetric: bool = True) -> QuantizedWeight:
    """int4 round-to-nearest in blocks of `block_size` along `axis`; returns unpacked values."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    weight = np.asarray(weight, dtype=np.float32)
    blocks = _blocked(weight, axis, block_size)  # [..., nblocks, block_size]
    if symmetric:
        absmax = np.abs(blocks).max(axis=-1)
        scale = np.where(absmax > 0, absmax / 7.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[..., None]), -7, 7).astype(np.int8)
        zero_point = None
    else:
        low = np.minimum(blocks.min(axis=-1), 0.0)
        high = np.maximum(blocks.max(axis=-1), 0.0)  # 0 stays exactly representable
        scale = np.where(high > low, (high - low) / 15.0, 1.0).astype(np.float32)
        zero_point = np.clip(np.rint(-low / scale), 0, 15).astype(np.uint8)
        q = np.clip(np.rint(blocks / scale[..., None]) + zero_point[..., None], 0, 15).astype(np.uint8)
    length = weight.shape[axis]
    q = np.moveaxis(q.reshape(q.shape[:-2] + (-1,))[..., :length], -1, axis)
    scale = np.moveaxis(scale, -1, axis)
    if zero_point is not None:
        zero_point = np.moveaxis(zero_point, -1, axis)
    return QuantizedWeight("int4", np.ascontiguousarray(q), np.ascontiguousarray(scale),
                           None if zero_point is None else np.ascontiguousarray(zero_point), axis, block_size,
                           tuple(weight.shape))


def quantize_int8_exact(weight: np.ndarray, axis: int, block_size: int = Q8_0_BLOCK_SIZE) -> QuantizedWeight | None:
    """Symmetric int8 in blocks of `block_size` along `axis` that DequantizeLinear turns back into exactly
    `weight`, bit for bit, or None when `weight` is not of that form.

    Each block's scale is its largest magnitude / k for the largest integer k <= 127 that reproduces the
    block: GGUF's Q8_0 rounds that value to exactly +-127 x its scale (and 127 x a float16 scale is exact
    in float32, so the division recovers the scale); k < 127 is tried only for blocks where 127 fails, and
    only if those are few (at most 1% of the blocks, or MAX_OFF_SCALE_BLOCKS). An all-zero block gets
    scale 1. Checked on every value: q x scale in float32 must equal it (as bits).
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.shape[axis] % block_size or not np.isfinite(weight).all():
        return None
    blocks = _blocked(weight, axis, block_size).reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=-1)
    if not _same_bits(blocks[absmax == 0], np.float32(0)).all():
        return None  # a -0.0 in an all-zero block: DequantizeLinear gives +0.0
    scale = np.ones(absmax.shape, np.float32)
    q = np.zeros(blocks.shape, np.int8)
    pending = np.flatnonzero(absmax > 0)
    for largest in range(127, 0, -1):
        if not pending.size:
            break
        if largest < 127 and pending.size > max(MAX_OFF_SCALE_BLOCKS, blocks.shape[0] // 100):
            return None  # most blocks are not +-127 x a scale: a float table (fail fast, not 126 more passes)
        trial_scale = absmax[pending] / np.float32(largest)
        trial_q = np.clip(np.rint(blocks[pending] / trial_scale[:, None]), -127, 127).astype(np.int8)
        exact = _same_bits(trial_q.astype(np.float32) * trial_scale[:, None], blocks[pending]).all(axis=-1)
        scale[pending[exact]] = trial_scale[exact]
        q[pending[exact]] = trial_q[exact]
        pending = pending[~exact]
    if pending.size:
        return None
    moved_shape = np.moveaxis(weight, axis, -1).shape
    q = np.moveaxis(q.reshape(moved_shape), -1, axis)
    scale = np.moveaxis(scale.reshape(moved_shape[:-1] + (-1,)), -1, axis)
    return QuantizedWeight("int8", np.ascontiguousarray(q), np.ascontiguousarray(scale), None, axis, block_size,
                           tuple(weight.shape))


def _same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise float32 equality of the bits (-0.0 and 0.0 differ)."""
    return np.ascontiguousarray(a, np.float32).view(np.uint32) == np.ascontiguousarray(b, np.float32).view(np.uint32)


def quantize(weight: np.ndarray, scheme: str, axis: int, block_size: int = INT4_BLOCK_SIZE, symmetric: bool = True) -> QuantizedWeight:
    """Quantize a 2-D weight whose input (reduction) dimension is `axis`."""
    if scheme == "int8":
        return quantize_int8(weight, axis)
    if scheme == "int4":
        return quantize_int4(weight, axis, block_size, symmetric)
    raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def pack_int4(values: np.ndarray) -> bytes:
    """Pack int4/uint4 values (flattened, C order) two per byte, low nibble first."""
    flat = (np.asarray(values).reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int, signed: bool) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    flat = np.empty(raw.size * 2, np.uint8)
    flat[0::2] = raw & 0x0F
    flat[1::2] = raw >> 4
    flat = flat[:count]
    if signed:
        return np.where(flat > 7, flat.astype(np.int16) - 16, flat).astype(np.int8)
    return flat


def error_stats(weight: np.ndarray, quantized: QuantizedWeight) -> dict:
    """How far the dequantized weight is from the original.

    max_rel_error: the largest |w - dq(w)| of a group divided by that group's max |w|, over all groups
      (a group is a channel for int8, a block for int4); bounded by 1/254 (int8) and 1/14 (symmetric int4)
      for round-to-nearest.
    rel_rms_error: ||w - dq(w)|| / ||w|| (Frobenius).
    max_abs_error: the largest |w - dq(w)|.
    """
    weight = np.asarray(weight, dtype=np.float32)
    error = np.abs(weight - quantized.dequantize())
    if quantized.block_size is None:
        group_err = error.max(axis=quantized.axis)
        group_max = np.abs(weight).max(axis=quantized.axis)
    else:
        group_err = _blocked(error, quantized.axis, quantized.block_size).max(axis=-1)
        group_max = np.abs(_blocked(weight, quantized.axis, quantized.block_size)).max(axis=-1)
    rel = np.where(group_max > 0, group_err / np.where(group_max > 0, group_max, 1.0), 0.0)
    norm = float(np.linalg.norm(weight))
    return {
        "max_rel_error": float(rel.max()) if rel.size else 0.0,
        "rel_rms_error": float(np.linalg.norm(error) / norm) if norm > 0 else 0.0,
        "max_abs_error": float(error.max()) if error.size else 0.0,
    }
