"""The Skellam mechanism's Renyi-DP bound, and the privacy event one distributed-DP round releases.

No library computes it: Opacus covers only the (subsampled) Gaussian, and Google's ``dp-accounting``
0.6 has Gaussian, Laplace, discrete Laplace and discrete Gaussian but no Skellam. So this module holds
the one published bound, Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for Differentially
Private Federated Learning" (https://arxiv.org/abs/2110.04995), §3 (the RDP of the multi-dimensional
Skellam mechanism), written for the noise Sk(mu, mu) = Poisson(mu) - Poisson(mu) of variance 2 mu per
coordinate. Everything else (composition, RDP -> (epsilon, delta)) is Opacus's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant

from fedtune.core.errors import ConfigError

#: Opacus's RDP orders; every RDP curve in fedtune is a value per order, in this order.
ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)


def skellam_rdp(order: float, l1: float, l2: float, mu: float) -> float:
    """Renyi-DP of order ``order`` of adding Sk(mu, mu) noise to each coordinate of an integer vector
    whose L1 and L2 sensitivities are ``l1`` and ``l2`` (Agarwal et al. 2021, §3, multi-dimensional Skellam RDP):

        eps(a) <= a l2^2 / (4 mu) + min(((2a - 1) l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu))

    The theorem is for integer orders a > 1; a fractional order is bounded by the next integer, since
    the Renyi divergence never decreases with its order (van Erven and Harremoes 2014, Theorem 3). The
    leading term is the Gaussian mechanism's a l2^2 / (2 sigma^2) at the same variance sigma^2 = 2 mu.
    """
    if not order > 1:
        raise ValueError(f"RDP order must be > 1, got {order}.")
    if mu <= 0:
        return math.inf
    a = math.ceil(order)
    gaussian = a * l2**2 / (4 * mu)
    return gaussian + min(((2 * a - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu))


@dataclass(frozen=True)
class SkellamEvent:
    """``steps`` releases of an integer sum with Sk(mu, mu) noise per coordinate (distributed DP:
    the sum of the surviving clients' Skellam shares), sensitivities ``l1``/``l2`` in integer units.

    Accounted without subsampling amplification (q = 1), which holds for any way the clients were chosen.
    """

    l1: float
    l2: float
    mu: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.l2 > 0 and self.l1 >= self.l2):
            raise ConfigError(f"Skellam sensitivities need l1 >= l2 > 0, got l1 = {self.l1}, l2 = {self.l2}.")
        if not self.mu >= 0:
            raise ConfigError(f"Skellam mu must be >= 0, got {self.mu}.")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}.")

    def rdp(self) -> np.ndarray:
        """The event's RDP over :data:`ORDERS` (all its steps composed: RDP adds)."""
        return np.array([self.steps * skellam_rdp(a, self.l1, self.l2, self.mu) for a in ORDERS])

    def same_mechanism(self, other: object) -> bool:
        return isinstance(other, SkellamEvent) and (self.l1, self.l2, self.mu) == (other.l1, other.l2, other.mu)
