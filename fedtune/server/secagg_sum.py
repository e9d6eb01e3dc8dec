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
from fedtune.privacy.mechanisms import MECHANISMS
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
    denominator: float,
    state: ServerState,
    info: SecAggInfo,
) -> Arrays:
    """The round's aggregate from the sum, through the same Aggregator interface as the plain path:
    the noised sum over ``denominator`` (``central``: noise added here; ``distributed``: the survivors'
    shares are in it), else the strategy's rank-aware weighted mean. ``distributed`` records its noise
    in ``info``."""
    parts = list(unmasked.weights.values())
    if unmasked.calibration is not None:  # the signed sum of integers and noise shares, back in delta units
        cal = unmasked.calibration
        summed = distributed.from_ring(unmasked.ints, unmasked.bits) / cal.scale
        info.distributed = _distributed_info(cal, len(parts), denominator)
    else:
        summed = unmasked.params.quantizer().dequantize_sum(unmasked.ints, len(parts))  # sum alpha_i delta_i (L,)
    mechanism = MECHANISMS.get(cfg.privacy.mechanism)
    aggregator = mechanism.aggregator(cfg, state.global_arrays, denominator, state.noise_rng, reference=expected)
    aggregator.add_sum(flat.unflatten(summed, expected, np.float64), parts)
    return aggregator.result()
