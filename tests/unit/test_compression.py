"""Compression against plain numpy: quantization stays within its stated bound and is unbiased;
error feedback sends everything eventually."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.core.errors import UpdateRejected
from fedtune.wire.compression import densify, dequantize, error_bound, quantize, sparsify_with_feedback


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("shape", [(37, 5), (64,), (3,)])
def test_quantize_then_dequantize_stays_within_one_step(bits: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=shape) * 1e-2).astype(np.float32)
    codes, scales = quantize(x, bits, 16, rng)
    back = dequantize(codes, scales, bits, 16, shape)
    assert back.shape == x.shape and back.dtype == np.float32
    assert np.abs(back - x).max() <= error_bound(scales, bits) * (1 + 1e-5)
    blocks = np.abs(np.concatenate([x.ravel(), np.zeros(-x.size % 16)])).reshape(-1, 16).max(axis=1)
    np.testing.assert_allclose(scales, blocks, rtol=1e-6)  # one absmax per block


@pytest.mark.parametrize("bits", [4, 8])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=256).astype(np.float32)
    mean = np.mean([dequantize(*quantize(x, bits, 64, rng), bits, 64, x.shape) for _ in range(2000)], axis=0)
    step = 1.0 / (2 ** (bits - 1) - 1)
    assert np.abs(mean - x).max() < 5 * step / np.sqrt(2000) * 2  # a few standard errors of the mean


def test_eight_bit_blockwise_costs_at_most_027_of_float32() -> None:
    x = np.random.default_rng(0).normal(size=(4096, 8)).astype(np.float32)
    codes, scales = quantize(x, 8, 64, np.random.default_rng(1))
    assert (codes.nbytes + scales.nbytes) / x.nbytes <= 0.27
    codes4, scales4 = quantize(x, 4, 64, np.random.default_rng(1))
    assert (codes4.nbytes + scales4.nbytes) / x.nbytes <= 0.141  # 0.5 + 4/64 bytes per value, over 4


def test_error_feedback_residuals_make_the_sent_total_equal_the_true_total() -> None:
    rng = np.random.default_rng(0)
    residual: dict[str, np.ndarray] = {}
    sent_total, true_total = np.zeros((20, 10), np.float64), np.zeros((20, 10), np.float64)
    for _ in range(6):
        delta = {"w": rng.normal(size=(20, 10)).astype(np.float32)}
        sent, residual = sparsify_with_feedback(delta, residual, 0.1)
        assert sent["w"].size == 20  # 10 % of 200 entries travel
        sent_total += densify(sent["w::index"], sent["w"], (20, 10))
        true_total += delta["w"]
    np.testing.assert_allclose(sent_total + residual["w"], true_total, atol=1e-5)


def test_malformed_compressed_arrays_are_rejected() -> None:
    with pytest.raises(UpdateRejected, match="indices"):
        densify(np.array([0, 99], np.int32), np.ones(2, np.float32), (10,))
    codes, scales = quantize(np.ones(32, np.float32), 8, 16, np.random.default_rng(0))
    with pytest.raises(UpdateRejected, match="scales"):
        dequantize(codes, scales[:1], 8, 16, (32,))
