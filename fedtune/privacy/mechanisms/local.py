"""``privacy.mechanism = local``: each client clips its delta to C and adds N(0, (z C)^2) before it
leaves the site, so the server need not be trusted.

Changing one client's data moves its delta by up to 2C, so each round is accounted as noise
multiplier z/2 and no amplification (the server sees who replied).
"""

from __future__ import annotations

from typing import Any

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.privacy.accounting import Event, GaussianEvent
from fedtune.privacy.central import noise_rng, privatize_locally
from fedtune.privacy.mechanisms.base import Mechanism, noise_source


class LocalDP(Mechanism):
    """User-level DP with an untrusted server: the site noises its own delta."""

    name = "local"
    user_level = True
    unit = "user-level: one site's whole data, for the federation (no trusted server)"
    trust = "each site clips and noises its own update before sending: the guarantee holds against the server too"

    def user_event(self, cfg: RunConfig, noise_multiplier: float, arrays: Arrays | None) -> Event | None:
        return GaussianEvent(noise_multiplier / 2, 1.0, 1)

    def problems(self, cfg: RunConfig) -> list[str]:
        return noise_source(cfg)

    def client_step(self, cfg: RunConfig, delta: Arrays, metrics: dict[str, Any]) -> Arrays:
        return privatize_locally(delta, cfg.privacy.clip_norm, cfg.privacy.noise_multiplier, noise_rng())

    def entry_bound(self, cfg: RunConfig, bound: float, noise_sigmas: float) -> float:
        p = cfg.privacy
        return min(bound, p.clip_norm) + noise_sigmas * max(p.noise_multiplier, 0.0) * p.clip_norm
