"""``privacy.mechanism = central``: user-level DP-FedAvg at a trusted server (McMahan et al. 2018,
https://arxiv.org/abs/1710.06963), with optional adaptive clipping (Andrew et al. 2021,
https://arxiv.org/abs/1905.03871); the maths is in ``privacy/central.py``.

Each round is one subsampled Gaussian release of the sum with sensitivity C; with
``server.sampling = poisson`` the client sampling rate q amplifies it, with fixed-size sampling
fedtune claims no amplification (q = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import UpdateRejected
from fedtune.privacy.accounting import Event, GaussianEvent
from fedtune.privacy.central import NoisedSum, clip, l2_norm, next_clip_norm, split_noise
from fedtune.privacy.mechanisms.base import Mechanism, noise_source, sum_sensitivity
from fedtune.strategies import Aggregator
from fedtune.wire import keys


def client_sample_rate(cfg: RunConfig) -> float:
    """The client sampling rate the accountant may use: q under Poisson sampling, else 1."""
    return cfg.server.fraction_train if cfg.server.sampling == "poisson" else 1.0


class ClipState(Protocol):
    """Where adaptive clipping keeps C between rounds (the run's privacy state)."""

    clip_norm: float | None


def count_stddev(cfg: RunConfig, expected_clients: float) -> float:
    """Adaptive clipping's count noise: ``privacy.clip-count-stddev``, or by default expected
    clients / 20 (Andrew et al.'s choice), raised to at least the noise multiplier so the delta
    keeps most of the budget: the count's share of z^-2 is then (2 sigma_b)^-2 <= z^-2 / 4."""
    if cfg.privacy.clip_count_stddev > 0:
        return cfg.privacy.clip_count_stddev
    return max(expected_clients / 20, cfg.privacy.noise_multiplier)


@dataclass
class CentralRound:
    """One ``central`` round's aggregator: DP-FedAvg's noised sum behind the strategies' Aggregator
    interface, and what adaptive clipping needs after it."""

    noised: NoisedSum
    count_stddev: float
    reference: Arrays = field(default_factory=dict)
    """Keys and shapes of the round's delta: what :meth:`result` noises, even with no reply."""
    lossy: bool = False
    """The uplink is compressed: decoding may move a clipped delta past C by a rounding step."""
    adapt: tuple[RunConfig, ClipState] | None = None
    """Set on the plain path: after :meth:`result`, adaptive clipping moves ``state.clip_norm``."""
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, delta: Arrays, weight: float, *, rank: int | None = None, under_clip: bool = False) -> None:
        """Every client has weight 1 (see :class:`NoisedSum`); the delta is clipped, or checked
        against C when the client clipped it."""
        if self.lossy:  # clip again: a rounding step past C is the codec's, not the client's
            delta, before = clip(delta, self.noised.clip_norm)
            norm = min(before, self.noised.clip_norm)
        else:
            norm = l2_norm(delta)
        try:
            self.noised.add(delta, norm, fits=under_clip)
        except ValueError as exc:
            raise UpdateRejected(str(exc)) from None

    def add_sum(self, total: Arrays, parts: Sequence[tuple[float, int]]) -> None:
        self.noised.add_sum(total, len(parts))

    def result(self) -> Arrays:
        """The noised mean; then, on the plain path, the next clip norm (the row's figures)."""
        delta = self.noised.result(self.reference)
        if self.adapt is not None:
            cfg, state = self.adapt
            self.figures = {"clip_norm": cfg.privacy.clip_norm, **adapt_clip(cfg, state, self, self.noised.rng)}
        return delta

    def metrics(self) -> dict[str, float]:
        return self.figures


def central_round(
    cfg: RunConfig,
    denominator: float,
    rng: np.random.Generator,
    reference: Arrays | None = None,
    state: ClipState | None = None,
) -> CentralRound:
    """The round's noised-sum aggregator for deltas shaped like ``reference``; under adaptive clipping
    part of the noise budget goes to the count of unclipped updates, and with ``state`` (the plain
    path) the clip norm moves after the round."""
    z = cfg.privacy.noise_multiplier
    std_b = count_stddev(cfg, denominator) if cfg.privacy.adaptive_clip else 0.0
    noised = NoisedSum(
        cfg.privacy.clip_norm,
        split_noise(z, std_b),
        denominator,
        rng,
        clip_on_server=cfg.privacy.clip_on == "server",
        sum_dtype=cfg.strategy.sum_dtype,
    )
    lossy = cfg.compression.uplink != "none"
    adapt = (cfg, state) if state is not None else None
    return CentralRound(noised, std_b, reference or {}, lossy, adapt)


def adapt_clip(cfg: RunConfig, state: ClipState, central: CentralRound, rng: np.random.Generator) -> dict[str, Any]:
    """After a ``central`` round with adaptive clipping: move C; the row fields it produced."""
    if not cfg.privacy.adaptive_clip:
        return {}
    p = cfg.privacy
    noised = central.noised
    new, share = next_clip_norm(
        p.clip_norm,
        noised.unclipped,
        noised.count,
        noised.denominator,
        central.count_stddev,
        p.target_quantile,
        p.clip_lr,
        rng,
    )
    state.clip_norm = new
    return {"clip_norm_next": new, "unclipped_share_noised": share}


class CentralDP(Mechanism):
    """Clip each delta to C (at the client or the server), noise the sum at the server."""

    name = "central"
    user_level = True
    unit = (
        "user-level: one site's whole data, for the federation (the server is trusted); neighbouring runs add or "
        "remove one site under Poisson sampling, and replace one site's contribution by zero under fixed-size sampling"
    )
    trust = (
        "the server sees each clipped update in the clear and adds the noise: the guarantee holds "
        "against anyone who sees the released adapters, not against the server"
    )
    tunes_clip = True
    clipped_sum = True

    def amplified(self, cfg: RunConfig) -> bool:
        """Only under ``server.sampling = poisson`` (q < 1), and only while the sample stays secret."""
        return client_sample_rate(cfg) < 1

    def user_event(self, cfg: RunConfig, noise_multiplier: float, arrays: Arrays | None) -> Event | None:
        return GaussianEvent(noise_multiplier, client_sample_rate(cfg), 1)

    def problems(self, cfg: RunConfig) -> list[str]:
        return noise_source(cfg) + sum_sensitivity(cfg)

    def aggregator(
        self, cfg: RunConfig, global_arrays: Arrays, denominator: float, rng: np.random.Generator, **server: Any
    ) -> Aggregator:
        return central_round(cfg, denominator, rng, server.get("reference"), server.get("state"))

    def client_step(self, cfg: RunConfig, delta: Arrays, metrics: dict[str, Any]) -> Arrays:
        if cfg.privacy.clip_on != "client":
            return delta
        delta, norm = clip(delta, cfg.privacy.clip_norm)
        metrics[keys.UNDER_CLIP] = int(norm <= cfg.privacy.clip_norm)
        return delta

    def entry_bound(self, cfg: RunConfig, bound: float, noise_sigmas: float) -> float:
        return min(bound, cfg.privacy.clip_norm)
