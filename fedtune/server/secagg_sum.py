"""From SecAgg+'s unmasked integer sum to the round's aggregate delta: the plain weighted mean, DP-FedAvg's
mean noised at the server (``central``), or the mean of a sum that already carries the clients' Skellam
noise shares (``distributed``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.privacy import distributed
from fedtune.privacy import rounds as privacy
from fedtune.privacy.secagg import flat
from fedtune.privacy.secagg.settings import Params
from fedtune.server.record import DistributedInfo, SecAggInfo
from fedtune.server.state import ServerState


@dataclass(frozen=True)
class Unmasked:
    """The survivors' sum modulo 2^``bits`` (uint32 (L,)) and how it was encoded."""

    ints: np.ndarray
    bits: int
    params: Params
    calibration: distributed.Calibration | None
    """Set under ``distributed``: the integers are signed, scaled deltas plus noise shares."""
    weights: Mapping[int, tuple[float, int]]
    """Each survivor's (alpha, LoRA rank)."""


def _distributed_info(cal: distributed.Calibration, survivors: int, denominator: float) -> DistributedInfo:
    """What a distributed-DP round released: sensitivities, noise target and the noise really present."""
    return DistributedInfo(
        scale=cal.scale,
        l1=cal.l1,
        l2=cal.l2,
        min_survivors=cal.min_survivors,
        mu_share=cal.mu_share,
        mu_target=cal.mu_target,
        mu_released=survivors * cal.mu_share,
        noise_std_of_mean=cal.noise_std(survivors) / denominator,
    )


def aggregate(
    cfg: RunConfig,
    unmasked: Unmasked,
    expected: Arrays,
    full_rank: int,
    denominator: float,
    state: ServerState,
    info: SecAggInfo,
) -> Arrays:
    """The round's aggregate from the sum: the noised sum over ``denominator`` (``central``: noise added
    here; ``distributed``: the survivors' shares are in it), else the weighted mean, each entry divided by
    the alpha of the sites whose rank covers it. ``distributed`` records its noise in ``info``."""
    weights = unmasked.weights
    if unmasked.calibration is not None:  # the signed sum of integers and noise shares, back in delta units
        cal = unmasked.calibration
        noised = distributed.from_ring(unmasked.ints, unmasked.bits) / cal.scale
        info.distributed = _distributed_info(cal, len(weights), denominator)
        return flat.unflatten(noised / denominator, expected)
    summed = unmasked.params.quantizer().dequantize_sum(unmasked.ints, len(weights))  # sum alpha_i delta_i (L,)
    if cfg.privacy.mechanism == "central":
        central = privacy.central_round(cfg, denominator, state.noise_rng)
        central.noised.add_sum(flat.unflatten(summed, expected), len(weights))
        return central.noised.result(expected)
    by_rank: dict[int, float] = {}
    for a, rank in weights.values():
        by_rank[rank] = by_rank.get(rank, 0.0) + a
    if set(by_rank) <= {full_rank}:
        return flat.unflatten(summed / sum(by_rank.values()), expected)
    cover = sum(a * flat.coverage(rank, expected) for rank, a in by_rank.items())
    mean = np.divide(summed, cover, out=np.zeros_like(summed), where=cover > 0)
    return flat.unflatten(mean, expected)
