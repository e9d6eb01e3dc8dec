"""DP-FedAvg's pieces against plain numpy: clipping, the noised mean, the noise scale, adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.privacy.central import NoisedSum, clip, l2_norm, next_clip_norm, privatize_locally, split_noise


def deltas(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)} for _ in range(n)
    ]


def flat(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.ravel() for v in d.values()]).astype(np.float64)


def test_clip_bounds_the_norm_and_keeps_the_direction() -> None:
    for d in deltas(5):
        clipped, norm = clip(d, 1.0)
        assert norm == pytest.approx(np.linalg.norm(flat(d)), rel=1e-6)
        assert l2_norm(clipped) <= 1.0 + 1e-6
        np.testing.assert_allclose(flat(clipped), flat(d) * min(1.0, 1.0 / norm), rtol=1e-6)
    small = {"a": np.full(3, 0.01, np.float32)}
    assert clip(small, 1.0)[0] is small


def test_noiseless_sum_equals_the_plain_sum_of_clipped_deltas_over_the_fixed_denominator() -> None:
    ds = deltas(6)
    agg = NoisedSum(1.5, 0.0, denominator=8.0, rng=np.random.default_rng(0), clip_on_server=True)
    for d in ds:
        agg.add(d, l2_norm(d))
    out = agg.result({k: np.zeros_like(v) for k, v in ds[0].items()})
    reference = sum(flat(d) * min(1.0, 1.5 / np.linalg.norm(flat(d))) for d in ds) / 8.0
    np.testing.assert_allclose(flat(out), reference, rtol=1e-5, atol=1e-7)
    assert agg.count == 6 and agg.unclipped == sum(np.linalg.norm(flat(d)) <= 1.5 for d in ds)


def test_noise_has_std_z_times_c_over_the_denominator() -> None:
    ref = {"w": np.zeros(200_000, np.float32)}
    agg = NoisedSum(0.5, 2.0, denominator=4.0, rng=np.random.default_rng(1), clip_on_server=True)
    out = agg.result(ref)["w"]
    assert out.std() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.01)
    assert abs(out.mean()) < 5 * 0.25 / math.sqrt(out.size)


def test_client_clipping_mode_rejects_an_update_above_c() -> None:
    agg = NoisedSum(1.0, 1.0, denominator=2.0, rng=np.random.default_rng(0), clip_on_server=False)
    agg.add({"a": np.full(4, 0.5, np.float32)}, 1.0, fits=True)  # norm exactly C passes
    with pytest.raises(ValueError, match=r"exceeds `privacy\.clip-norm`"):
        agg.add({"a": np.full(4, 1.0, np.float32)}, 2.0)


def test_adaptive_split_spends_the_same_as_one_release() -> None:
    z, sigma_b = 1.2, 3.0
    z_delta = split_noise(z, sigma_b)
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
    assert z_delta > z
    with pytest.raises(ValueError, match="clip-count-stddev"):
        split_noise(2.0, 1.0)


def test_clip_norm_moves_geometrically_towards_the_quantile() -> None:
    rng = np.random.default_rng(0)
    up, share = next_clip_norm(1.0, unclipped=0, denominator=10, count_stddev=0.0, quantile=0.5, lr=0.2, rng=rng)
    assert share == 0 and up == pytest.approx(math.exp(0.1))
    down, _ = next_clip_norm(1.0, unclipped=10, denominator=10, count_stddev=0.0, quantile=0.5, lr=0.2, rng=rng)
    assert down == pytest.approx(math.exp(-0.1))


def test_local_privatization_clips_then_adds_noise_of_std_z_c() -> None:
    d = {"w": np.full(100_000, 1.0, np.float32)}
    out = privatize_locally(d, 2.0, 0.5, np.random.default_rng(0))["w"]
    clipped = clip(d, 2.0)[0]["w"]
    assert (out - clipped).std() == pytest.approx(0.5 * 2.0, rel=0.02)
    np.testing.assert_allclose(privatize_locally(d, 2.0, 0.0, np.random.default_rng(0))["w"], clipped)
