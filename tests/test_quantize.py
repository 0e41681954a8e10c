"""Quantization maths: round-to-nearest bounds, packing, byte counts (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from ortft.quantize import (
    error_stats,
    pack_int4,
    quantize,
    quantize_int4,
    quantize_int8,
    quantize_int8_exact,
    unpack_int4,
)

from helpers.quantized import q8_0_values


def _weight(shape=(96, 80), seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1])
def test_int8_per_channel_error_below_one_percent(axis):
    weight = _weight()
    quantized = quantize_int8(weight, axis)
    assert quantized.q.dtype == np.int8 and quantized.scale.shape == (weight.shape[1 - axis],)
    stats = error_stats(weight, quantized)
    assert stats["max_rel_error"] < 0.01
    assert stats["max_rel_error"] <= 0.5 / 127 + 1e-6  # round to nearest: half a step of absmax / 127
    assert quantized.nbytes() == weight.size + 4 * weight.shape[1 - axis]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_int4_blocked_error_is_round_to_nearest(symmetric, block_size):
    weight = _weight()
    quantized = quantize_int4(weight, axis=0, block_size=block_size, symmetric=symmetric)
    blocks = -(-weight.shape[0] // block_size)
    assert quantized.scale.shape == (blocks, weight.shape[1])
    error = np.abs(weight - quantized.dequantize())
    # Every value is within half a quantization step of its block.
    step = np.repeat(quantized.scale, block_size, axis=0)[: weight.shape[0]]
    assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-12)
    stats = error_stats(weight, quantized)
    assert stats["max_rel_error"] <= (1 / 14 if symmetric else 1 / 15) + 1e-6
    # Gaussian weights: relative RMS error of 4-bit RTN grows with the block size, stays ~10%.
    assert 0.03 < stats["rel_rms_error"] < 0.15
    assert not symmetric or quantized.zero_point is None


def test_int4_error_grows_with_block_size():
    weight = _weight((256, 64))
    errors = [error_stats(weight, quantize_int4(weight, 0, size))["rel_rms_error"] for size in (16, 32, 128)]
    assert errors[0] < errors[1] < errors[2]


def test_pack_unpack_int4_round_trip():
    values = np.array([-7, -1, 0, 3, 7, -8, 5], np.int8)
    packed = pack_int4(values)
    assert len(packed) == 4 and packed[0] == ((-1 & 0xF) << 4 | (-7 & 0xF))  # low nibble first
    np.testing.assert_array_equal(unpack_int4(packed, values.size, signed=True), values)
    unsigned = np.array([0, 15, 8, 1], np.uint8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(unsigned), 4, signed=False), unsigned)


def test_int4_bytes_and_zero_weights():
    weight = np.zeros((64, 8), np.float32)
    quantized = quantize(weight, "int4", axis=0, block_size=32)
    assert quantized.nbytes() == 64 * 8 // 2 + 2 * 8 * 4
    np.testing.assert_array_equal(quantized.dequantize(), weight)
    assert error_stats(weight, quantized)["max_rel_error"] == 0.0
    with pytest.raises(ValueError):
        quantize(weight, "int2", axis=0)


@pytest.mark.parametrize("axis", [0, 1])
def test_int8_exact_recovers_q8_0_values_bit_for_bit(axis):
    weight = q8_0_values((64, 96), axis)
    weight[3] = 0.0  # all-zero blocks are exact too
    quantized = quantize_int8_exact(weight, axis)
    assert quantized is not None and quantized.q.dtype == np.int8 and quantized.block_size == 32
    assert quantized.scale.shape == tuple(n // 32 if i == axis else n for i, n in enumerate(weight.shape))
    assert np.array_equal(quantized.dequantize().view(np.uint32), weight.view(np.uint32))
    assert error_stats(weight, quantized)["max_abs_error"] == 0.0
    assert quantized.nbytes() == weight.size + quantized.scale.size * 4


def test_int8_exact_refuses_anything_not_exactly_representable():
    weight = q8_0_values((64, 96))
    assert quantize_int8_exact(_weight((64, 96)), axis=1) is None  # a float table
    nudged = weight.copy()
    nudged[5, 7] = np.nextafter(nudged[5, 7], np.float32(1))  # one value one ulp off
    assert quantize_int8_exact(nudged, axis=1) is None
    signed_zero = weight.copy()
    signed_zero[0, :32] = 0.0
    signed_zero[0, 0] = -0.0  # dequantizes to +0.0: not the same bits
    assert quantize_int8_exact(signed_zero, axis=1) is None
    assert quantize_int8_exact(weight[:, :80], axis=1) is None  # 80 is not a whole number of blocks
    assert quantize_int8_exact(weight, axis=0) is None  # blocks along the other axis do not share a scale
