"""Privacy accounting through Opacus's accountants (RDP, PRV); no accountant maths is written here.

An event is a Gaussian mechanism with Poisson subsampling, repeated: (noise multiplier, sample rate,
steps). A history of events composes; the accountant turns it into epsilon at a given delta.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedtune.errors import ConfigError

Accountant = Literal["rdp", "prv"]


@dataclass(frozen=True)
class GaussianEvent:
    """``steps`` releases of a subsampled Gaussian mechanism (DP-SGD steps, or DP-FedAvg rounds)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ConfigError(f"noise multiplier must be >= 0, got {self.noise_multiplier}.")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample rate must be in (0, 1], got {self.sample_rate}.")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}.")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}.")


def make_accountant(kind: Accountant, events: Iterable[GaussianEvent]) -> IAccountant:
    """An Opacus accountant holding ``events`` as its history."""
    accountant: IAccountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
    # Composition is commutative, so releases of the same mechanism become one entry with their
    # steps summed: the same epsilon, computed once per distinct mechanism.
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps > 0:
            steps[(e.noise_multiplier, e.sample_rate)] = steps.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
    accountant.history = [(z, q, n) for (z, q), n in steps.items()]
    return accountant


def epsilon(events: Iterable[GaussianEvent], delta: float, kind: Accountant = "rdp") -> float:
    """Epsilon of the composed ``events`` at ``delta``; inf when any release had no noise."""
    _check_delta(delta)
    events = list(events)
    if any(e.noise_multiplier == 0 and e.steps > 0 for e in events):
        return math.inf  # an un-noised release has no finite guarantee
    if not any(e.steps > 0 for e in events):
        return 0.0
    return float(make_accountant(kind, events).get_epsilon(delta=delta))


def noise_multiplier(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, kind: Accountant = "rdp"
) -> float:
    """The smallest noise multiplier (Opacus's search) whose ``steps`` steps stay within epsilon."""
    _check_delta(delta)
    if not target_epsilon > 0:
        raise ConfigError(f"target epsilon must be > 0, got {target_epsilon}.")
    GaussianEvent(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)  # validates q and steps
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=kind
        )
    )
