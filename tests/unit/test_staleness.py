"""Staleness weights (``strategy.staleness``) against numpy references, and the async config keys' checks."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.config import RunConfig, StrategyConfig
from fedtune.core.errors import ConfigError
from fedtune.strategies.staleness import STALENESS, staleness_weight

SS = np.arange(0, 40)  # staleness 0..39


def weights(cfg: StrategyConfig) -> np.ndarray:
    return np.array([staleness_weight(int(s), cfg) for s in SS])


@pytest.mark.parametrize("a", [0.5, 1.0, 2.5])
def test_polynomial_matches_numpy_power(a: float) -> None:
    # Prepare
    cfg = StrategyConfig(staleness="polynomial", staleness_exponent=a)

    # Execute
    got = weights(cfg)

    # Assert: FedAsync's s_a(t - tau) = (t - tau + 1)^-a
    np.testing.assert_allclose(got, np.power(SS + 1.0, -a), rtol=1e-12)


def test_polynomial_default_is_fedbuffs_inverse_square_root() -> None:
    np.testing.assert_allclose(weights(StrategyConfig()), 1 / np.sqrt(1 + SS), rtol=1e-12)


@pytest.mark.parametrize(("a", "b"), [(10.0, 4), (0.5, 0), (2.0, 7)])
def test_hinge_matches_numpy_where(a: float, b: int) -> None:
    # Prepare
    cfg = StrategyConfig(staleness="hinge", staleness_exponent=a, staleness_cutoff=b)

    # Execute
    got = weights(cfg)

    # Assert: FedAsync's s_{a,b}(t - tau) = 1 if t - tau <= b, else 1 / (a (t - tau - b) + 1)
    ref = np.where(np.less_equal(SS, b), 1.0, 1.0 / (a * np.maximum(SS - b, 0) + 1.0))
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_constant_is_one_and_every_weight_is_in_zero_one_and_non_increasing() -> None:
    np.testing.assert_array_equal(weights(StrategyConfig(staleness="constant")), np.ones(len(SS)))
    for name in STALENESS.names():
        w = weights(StrategyConfig(staleness=name))  # type: ignore[arg-type]
        assert np.all((w > 0) & (w <= 1)) and np.all(np.diff(w) <= 0), name


def test_negative_staleness_is_an_internal_error() -> None:
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(-1, StrategyConfig())


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("server.mode", "later", "server.mode"),
        ("server.buffer-size", 0, "server.buffer-size"),
        ("server.concurrency", -1, "server.concurrency"),
        ("server.max-staleness", -2, "server.max-staleness"),
        ("strategy.staleness", "linear", "strategy.staleness"),
        ("strategy.staleness-exponent", -0.5, "strategy.staleness-exponent"),
        ("simulation.site-delays", "0,x", "simulation.site-delays"),
        ("simulation.site-delays", "0,-1", "simulation.site-delays"),
        ("simulation.site-delays", "nan", "simulation.site-delays"),
    ],
)
def test_bad_async_keys_are_refused_naming_the_key(key: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat({key: value})


def test_site_delays_cycle_over_partitions_like_site_ranks() -> None:
    sim = RunConfig.from_flat({"simulation.site-delays": "0, 0,2.5"}).simulation
    assert [sim.delay(p) for p in range(7)] == [0.0, 0.0, 2.5, 0.0, 0.0, 2.5, 0.0]
    assert RunConfig().simulation.delay(3) == 0.0
