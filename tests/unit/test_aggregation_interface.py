"""One aggregation interface: a reply folded in with ``add`` and a SecAgg+ sum with ``add_sum`` give the
same rank-aware mean; rules that need every update refuse a sum."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.config import StrategyConfig
from fedtune.core.errors import FedtuneError, UpdateRejected
from fedtune.model.lora import pad_rank, rank_slice
from fedtune.privacy import distributed
from fedtune.strategies import make_aggregator
from fedtune.strategies.aggregators import WeightedMean

GLOBAL = {
    "m.lora_A.weight": np.zeros((4, 3), np.float32),  # (r, in)
    "m.lora_B.weight": np.zeros((5, 4), np.float32),  # (out, r)
}


def sites() -> list[tuple[dict[str, np.ndarray], float, int]]:
    rng = np.random.default_rng(0)
    out = []
    for rank, weight in ((4, 3.0), (2, 1.0), (1, 2.0), (2, 5.0)):
        small = rank_slice({k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}, rank)
        padded, _ = pad_rank(small, GLOBAL)
        out.append((padded, weight, rank))
    return out


def reference_mean() -> dict[str, np.ndarray]:
    """Plain numpy: each entry over the weight of the sites whose rank covers it."""
    out = {}
    for key, like in GLOBAL.items():
        total, cover = np.zeros(like.shape), np.zeros(like.shape)
        for delta, weight, rank in sites():
            covered = np.zeros(like.shape)
            covered[(slice(0, rank), slice(None)) if "lora_A" in key else (slice(None), slice(0, rank))] = 1.0
            total += weight * delta[key]
            cover += weight * covered
        out[key] = total / cover
    return out


def test_the_plain_path_and_the_secure_sum_give_the_same_rank_aware_mean() -> None:
    # Prepare
    plain, summed = WeightedMean(StrategyConfig(), GLOBAL), WeightedMean(StrategyConfig(), GLOBAL)
    total = {k: sum(w * d[k].astype(np.float64) for d, w, _ in sites()) for k in GLOBAL}

    # Execute
    for delta, weight, rank in sites():
        plain.add(delta, weight, rank=rank)
    summed.add_sum(total, [(w, rank) for _, w, rank in sites()])

    # Assert
    for key, want in reference_mean().items():
        np.testing.assert_allclose(plain.result()[key], want, rtol=1e-5)
        np.testing.assert_allclose(summed.result()[key], want, rtol=1e-5)


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum", "exact"])
def test_rules_that_need_every_update_refuse_a_sum_and_a_lower_rank(name: str) -> None:
    # Prepare
    aggregator = make_aggregator(StrategyConfig(name=name), GLOBAL)
    delta, weight, _ = sites()[0]

    # Execute / Assert
    with pytest.raises(FedtuneError, match="needs every update"):
        aggregator.add_sum(delta, [(weight, 4)])
    with pytest.raises(UpdateRejected, match=f"`strategy.name` = {name} has no rule for rank 2"):
        aggregator.add(delta, weight, rank=2)


def test_the_distributed_sum_takes_only_a_sum_and_divides_by_its_denominator() -> None:
    # Prepare
    mean = distributed.NoisedMean(denominator=4.0)
    total = {k: np.full(v.shape, 2.0) for k, v in GLOBAL.items()}

    # Execute
    mean.add_sum(total, [(1.0, 4), (1.0, 2)])

    # Assert
    with pytest.raises(FedtuneError, match="only a secure sum"):
        mean.add(total, 1.0)
    for key in GLOBAL:
        np.testing.assert_array_equal(mean.result()[key], np.full(GLOBAL[key].shape, 0.5, np.float32))
