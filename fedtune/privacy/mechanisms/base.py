"""What a privacy mechanism is: one object that owns both halves of ``privacy.mechanism``.

Like Flower's DP strategy wrapper paired with its client mod, one name stands for the site's step
(what a site does to its delta), the server's aggregator, the accounting events, and the composition
rules the plan checker asks of every round. The rest of fedtune asks a mechanism facts, never its name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.privacy.accounting import Event
from fedtune.privacy.ledger import Ledger
from fedtune.strategies import STRATEGIES, Aggregator, make_aggregator


class Mechanism:
    """A privacy mechanism; subclasses override the facts and steps that differ from "no DP"."""

    name: str = ""
    """The ``privacy.mechanism`` value it is registered under."""
    dp: bool = True
    """It gives a formal DP guarantee (so a site's clear train loss, data-check counts and seconds,
    which no guarantee covers, are not sent)."""
    user_level: bool = False
    """Its guarantee is user-level for the federation, accounted at the server (else sample-level per site)."""
    unit: str = ""
    """The guarantee's unit, in words (``summary.json``)."""
    trust: str = ""
    """Whom the guarantee holds against, in words (``summary.json``)."""
    site_ledger: bool = False
    """Sites train with DP-SGD and keep their own ledger (the site's privacy keys apply)."""
    tunes_clip: bool = False
    """``privacy.clip-on`` = server and ``privacy.adaptive-clip`` apply."""
    clipped_sum: bool = False
    """The server noises a sum of deltas clipped to C: under SecAgg+ quantization must keep each within C."""
    noise_in_sum: bool = False
    """The sites add noise shares inside the SecAgg+ sum (integer encoding, Skellam shares, a floor ledger)."""

    @property
    def clear_site_metrics(self) -> bool:
        """A site may send its train loss, data-check counts and timing."""
        return not self.dp

    def amplified(self, cfg: RunConfig) -> bool:
        """The round's user-level event counts amplification by client sampling."""
        return False

    def user_event(self, cfg: RunConfig, noise_multiplier: float, arrays: Arrays | None) -> Event | None:
        """The user-level release one round makes (the least, for noise shares), None if none."""
        return None

    def problems(self, cfg: RunConfig) -> list[str]:
        """This mechanism's composition rules for one round's config; empty when it can run."""
        return []

    def aggregator(
        self, cfg: RunConfig, global_arrays: Arrays, denominator: float, rng: np.random.Generator, **server: Any
    ) -> Aggregator:
        """The round's aggregator: the strategy's, unless the mechanism wraps it (``server``: what the
        plain path adds, ``reference`` arrays and the privacy ``state``)."""
        return make_aggregator(cfg.strategy, global_arrays)

    def client_step(self, cfg: RunConfig, delta: Arrays, metrics: dict[str, Any]) -> Arrays:
        """What a site does to its delta before it leaves (clip, noise); may add to ``metrics``."""
        return delta

    def entry_bound(self, cfg: RunConfig, bound: float, noise_sigmas: float) -> float:
        """The per-coordinate range of an honest delta whose training moves it at most ``bound``."""
        return bound

    def budget_ledger(self, ledger: Ledger, floor: Ledger) -> Ledger:
        """The ledger the budget check reads."""
        return ledger

    def charge(
        self, ledger: Ledger, floor: Ledger, target: Event | None, event: Event | None, rnd: int, released: bool
    ) -> None:
        """Record round ``rnd``: ``event`` (what it really released) or else its ``target`` event."""
        event = event or target
        if event is not None:
            ledger.add(event)


def noise_source(cfg: RunConfig) -> list[str]:
    """A DP mechanism needs its noise set or solved, and a budget needs noise."""
    p = cfg.privacy
    if p.noise_multiplier == -1 and p.target_epsilon == 0:
        return [f"`privacy.mechanism` = {p.mechanism} needs `privacy.noise-multiplier` or `privacy.target-epsilon`."]
    if p.noise_multiplier == 0 and p.target_epsilon > 0:
        return [
            "`privacy.noise-multiplier` = 0 makes epsilon infinite, which no `privacy.target-epsilon` allows; "
            "drop the target or add noise."
        ]
    return []


def sum_sensitivity(cfg: RunConfig) -> list[str]:
    """DP-FedAvg's noise (central, or the clients' shares) covers a sum of clipped deltas, each weighted 1."""
    m = cfg.privacy.mechanism
    out = []
    if cfg.strategy.weighting == "examples":
        out.append(
            f"`privacy.mechanism` = {m} needs `strategy.weighting` = uniform: weighting by examples lets one "
            "client move the sum by more than `privacy.clip-norm`."
        )
    if cfg.strategy.name in STRATEGIES and STRATEGIES.get(cfg.strategy.name).individual_updates:
        out.append(
            f"`strategy.name` = {cfg.strategy.name} under `privacy.mechanism` = {m}: the noise covers a sum of "
            "clipped deltas, not this rule's output; use a fedavg-family strategy (or `privacy.mechanism` = local)."
        )
    if cfg.simulation.site_ranks:
        out.append(
            f"`simulation.site-ranks` under `privacy.mechanism` = {m}: per-entry averaging over different ranks "
            "has no single sensitivity; use one rank."
        )
    return out
