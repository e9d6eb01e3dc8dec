"""FedAvg of deltas against a weighted mean computed independently with numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.config import StrategyConfig
from fedtune.errors import ConfigError
from fedtune.strategies import STRATEGIES
from fedtune.strategies.fedavg import FedAvg


def _updates(n: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [
        {
            "a.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32),
            "a.lora_B.weight": rng.normal(size=(16, 4)).astype(np.float32),
        }
        for _ in range(n)
    ]


def test_fedavg_equals_weighted_mean() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    updates = _updates(5, rng)
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    strategy = FedAvg(StrategyConfig())

    # Execute
    for u, w in zip(updates, weights, strict=True):
        strategy.add(u, w)
    combined = strategy.combine()

    # Assert
    for key in updates[0]:
        stacked = np.stack([u[key].astype(np.float64) for u in updates])  # (N, ...)
        expected = np.tensordot(np.asarray(weights) / np.sum(weights), stacked, axes=1)
        np.testing.assert_allclose(combined[key], expected, rtol=1e-6, atol=1e-7)


def test_fedavg_step_applies_server_lr() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    global_arrays, delta = _updates(2, rng)
    strategy = FedAvg(StrategyConfig(server_lr=0.5))

    # Execute
    new = strategy.step(global_arrays, delta)

    # Assert
    for key in global_arrays:
        np.testing.assert_allclose(new[key], global_arrays[key] + 0.5 * delta[key], rtol=1e-6)


def test_registry_knows_fedavg_and_lists_names_for_unknown() -> None:
    assert STRATEGIES.get("fedavg") is FedAvg
    with pytest.raises(ConfigError, match=r"strategy\.name` must be one of fedavg"):
        STRATEGIES.get("nope")


def test_negative_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        FedAvg(StrategyConfig()).add({"x": np.zeros(2, np.float32)}, -1.0)
