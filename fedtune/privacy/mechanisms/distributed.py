"""``privacy.mechanism = distributed``: each client adds a Skellam noise share inside SecAgg+, so the
server sees only the noised sum (``privacy/distributed.py``, ``privacy/skellam.py``).

Each round is one Skellam release of the integer sum with the noise its survivors really added; a
second ledger, ``floor``, charges every round at the target noise, and the budget check reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.privacy import distributed
from fedtune.privacy.accounting import Event
from fedtune.privacy.ledger import Ledger
from fedtune.privacy.mechanisms.base import Mechanism, noise_source, sum_sensitivity
from fedtune.strategies import Aggregator


class DistributedDP(Mechanism):
    """User-level DP with the server seeing only the noised sum."""

    name = "distributed"
    user_level = True
    unit = (
        "user-level: one site's whole data, for the federation, each round it takes part in "
        "(the server sees only the noised sum)"
    )
    trust = (
        "honest-but-curious server: under SecAgg+ it sees only the sum of the surviving clients' "
        "inputs, each the client's delta clipped to `privacy.clip-norm` and rounded to integers, plus that client's "
        "Skellam noise share; the clients are trusted to clip and to add their share (drawn from OS entropy). "
        "Neighbouring runs differ in one site's data (its update zero instead, while it still adds its share). "
        "`epsilon` counts the noise of every survivor, all shares secret from the server"
    )
    noise_in_sum = True

    def user_event(self, cfg: RunConfig, noise_multiplier: float, arrays: Arrays | None) -> Event | None:
        """The least noise the round can release (its target), which needs the adapter's size."""
        if arrays is None:
            raise ValueError("a distributed-DP event needs the adapter's size")
        return distributed.target_event(cfg, noise_multiplier, distributed.adapter_length(cfg, arrays))

    def problems(self, cfg: RunConfig) -> list[str]:
        out = noise_source(cfg) + sum_sensitivity(cfg)
        if cfg.privacy.accountant != "rdp":
            out.append(
                "`privacy.mechanism` = distributed is accounted with the Skellam RDP bound; set "
                "`privacy.accountant` = rdp."
            )
        if cfg.secagg.clip > 0:
            out.append(
                "`secagg.clip` does not apply to `privacy.mechanism` = distributed (the L2 clip `privacy.clip-norm` "
                "and `secagg.quant-bits` set the integer range); leave it at 0."
            )
        return out

    def aggregator(
        self, cfg: RunConfig, global_arrays: Arrays, denominator: float, rng: np.random.Generator, **server: Any
    ) -> Aggregator:
        return distributed.NoisedMean(denominator)

    def budget_ledger(self, ledger: Ledger, floor: Ledger) -> Ledger:
        return floor

    def charge(
        self, ledger: Ledger, floor: Ledger, target: Event | None, event: Event | None, rnd: int, released: bool
    ) -> None:
        if target is not None:
            floor.add(target)
        super().charge(ledger, floor, target, event, rnd, released)
