"""SecAgg+ quantization against plain numpy: modulus size, the wire dtype, rounding bias and the error bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.privacy.secagg.quantize import Quantizer, modulus_bits, wire_dtype


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 100, 1000, 1024, 1025])
@pytest.mark.parametrize("bits", [1, 8, 16])
def test_modulus_bits_is_bits_plus_ceil_log2_n_and_holds_the_largest_sum(n: int, bits: int) -> None:
    # Execute
    b = modulus_bits(n, bits)
    # Assert
    assert b == bits + math.ceil(math.log2(n))
    assert n * (2**bits - 1) <= 2**b - 1  # the largest possible sum does not wrap


@pytest.mark.parametrize(("n", "bits"), [(2, 32), (1000, 23), (2**16 + 1, 16), (3, 31)])
def test_modulus_bits_refuses_more_than_32_bits(n: int, bits: int) -> None:
    with pytest.raises(ValueError, match="uint32"):
        modulus_bits(n, bits)


def test_modulus_bits_accepts_exactly_32_bits() -> None:
    assert modulus_bits(1000, 22) == 32
    assert modulus_bits(2**16, 16) == 32


@pytest.mark.parametrize(
    ("b", "dtype"), [(1, np.uint8), (8, np.uint8), (9, np.uint16), (16, np.uint16), (32, np.uint32)]
)
def test_wire_dtype_is_the_smallest_unsigned_type_of_at_most_32_bits(b: int, dtype: type) -> None:
    assert wire_dtype(b) == np.dtype(dtype)
    assert wire_dtype(b).itemsize <= 4


def test_wire_dtype_refuses_more_than_32_bits() -> None:
    with pytest.raises(ValueError, match=r"1\.\.32"):
        wire_dtype(33)


@pytest.mark.parametrize(("clip", "bits"), [(0.0, 8), (-1.0, 8), (math.inf, 8), (1.0, 0), (1.0, 32)])
def test_quantizer_refuses_bad_settings(clip: float, bits: int) -> None:
    with pytest.raises(ValueError, match="quantization"):
        Quantizer(clip=clip, bits=bits)


def test_quantize_gives_uint32_on_the_grid_and_each_value_within_one_step() -> None:
    # Prepare
    q = Quantizer(clip=0.5, bits=10)
    x = np.random.default_rng(0).normal(0, 0.4, size=5000).astype(np.float32)
    # Execute
    ints = q.quantize(x, np.random.default_rng(1))
    back = q.dequantize_sum(ints, 1)
    # Assert
    assert ints.dtype == np.uint32 and ints.shape == x.shape
    assert ints.max() <= 2**10 - 1
    assert np.all(np.abs(back - np.clip(x.astype(np.float64), -0.5, 0.5)) < q.step)


def test_grid_points_round_trip_exactly() -> None:
    q = Quantizer(clip=2.0, bits=4)
    grid = np.arange(16) * (4.0 / 15) - 2.0
    ints = q.quantize(grid, np.random.default_rng(0))
    np.testing.assert_array_equal(ints, np.arange(16))
    np.testing.assert_allclose(q.dequantize_sum(ints, 1), grid, atol=1e-12)


def test_stochastic_rounding_is_unbiased() -> None:
    # Prepare: one value between grid points, quantized many times
    q = Quantizer(clip=1.0, bits=3)
    value = 0.1234
    x = np.full(200_000, value, dtype=np.float32)
    # Execute
    mean = q.dequantize_mean(q.quantize(x, np.random.default_rng(2)), 1).mean()
    # Assert: within 5 standard errors (each draw errs by at most one step)
    assert abs(mean - np.float32(value)) < 5 * q.step / math.sqrt(x.size)


def test_dequantized_mean_of_a_sum_is_within_one_step_of_the_clipped_mean() -> None:
    # Prepare: 9 clients, some coordinates beyond the clip range
    q = Quantizer(clip=0.1, bits=12)
    rng = np.random.default_rng(3)
    xs = [rng.normal(0, 0.08, size=3000).astype(np.float32) for _ in range(9)]
    # Execute
    total = np.sum([q.quantize(x, rng).astype(np.int64) for x in xs], axis=0)
    mean = q.dequantize_mean(total, 9)
    # Assert
    reference = np.mean([np.clip(x.astype(np.float64), -0.1, 0.1) for x in xs], axis=0)
    assert np.max(np.abs(mean - reference)) <= q.mean_error_bound()
    assert q.mean_error_bound() == pytest.approx(0.2 / 4095)


def test_quantize_refuses_non_finite_values() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        Quantizer(clip=1.0, bits=8).quantize(np.array([0.0, np.nan]), np.random.default_rng(0))
