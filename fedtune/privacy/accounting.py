"""Privacy accounting through Opacus's accountants (RDP, PRV); no accountant maths is written here.

An event is a Gaussian mechanism with Poisson subsampling, repeated: (noise multiplier, sample rate,
steps), or a Skellam release (``privacy/skellam.py``) that carries its own RDP curve over Opacus's
orders. A history of events composes; the accountant turns it into epsilon at a given delta. Skellam
events compose only under the RDP accountant: their curves add to Opacus's Gaussian RDP and Opacus's
``get_privacy_spent`` converts the total.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from fedtune.core.errors import ConfigError
from fedtune.privacy.skellam import ORDERS, SkellamEvent

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


Event = GaussianEvent | SkellamEvent


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


def _noiseless(e: Event) -> bool:
    return e.steps > 0 and (e.mu == 0 if isinstance(e, SkellamEvent) else e.noise_multiplier == 0)


def epsilon(events: Iterable[Event], delta: float, kind: Accountant = "rdp") -> float:
    """Epsilon of the composed ``events`` at ``delta``; inf when any release had no noise."""
    _check_delta(delta)
    events = list(events)
    if any(_noiseless(e) for e in events):
        return math.inf  # an un-noised release has no finite guarantee
    if not any(e.steps > 0 for e in events):
        return 0.0
    skellam = [e for e in events if isinstance(e, SkellamEvent)]
    gaussian = [e for e in events if isinstance(e, GaussianEvent)]
    if not skellam:
        return float(make_accountant(kind, gaussian).get_epsilon(delta=delta))
    if kind != "rdp":
        raise ConfigError("Skellam (distributed DP) releases are accounted in RDP only; set `privacy.accountant` = rdp")
    return rdp_epsilon(sum_rdp(events), delta)


def sum_rdp(events: Iterable[Event]) -> np.ndarray:
    """The composed RDP of ``events`` over Opacus's orders: Opacus's Gaussian RDP plus Skellam curves."""
    total = np.zeros(len(ORDERS))
    for e in events:
        if isinstance(e, SkellamEvent):
            total += e.rdp()
        elif e.steps > 0:
            total += rdp_analysis.compute_rdp(
                q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=list(ORDERS)
            )
    return total


def rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    """Opacus's RDP -> (epsilon, delta) conversion (Balle et al. 2020) of an RDP curve over ``ORDERS``."""
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound stays valid
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=list(rdp), delta=delta)
    return float(eps)


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
