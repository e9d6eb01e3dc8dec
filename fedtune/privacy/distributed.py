"""Distributed DP on SecAgg+ (``privacy.mechanism = distributed``): integer encoding, Skellam noise
shares, and their calibration to the clients that may drop.

Each client clips its delta to L2 norm C (``privacy.clip-norm``), scales it so that C becomes
S = 2^(quant-bits - 1) integer units, and rounds it to integers by conditional stochastic rounding
(Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", https://arxiv.org/abs/2102.06387, "conditional randomized rounding"):
unbiased rounding, redrawn until the integer vector's L2 norm is at most

    l2 = sqrt(min(S^2 + d/4 + sqrt(2 ln(1/beta)) (S + sqrt(d)/2), (S + sqrt(d))^2)),

which holds by construction (the second term always holds, the first with probability >= 1 - beta).
For integers |v| <= v^2, so the L1 norm is at most l1 = min(l2^2, sqrt(d) l2). The client then adds a
Skellam share Sk(mu_i, mu_i) = Poisson(mu_i) - Poisson(mu_i), drawn from the OS's entropy, and masks
the sum modulo 2^b. Poisson laws add exactly, so the unmasked sum of U survivors carries exactly
Sk(U mu_i, U mu_i) noise (Agarwal, Kairouz and Liu 2021, https://arxiv.org/abs/2110.04995).

Calibration: the target is the noise of central DP-FedAvg, standard deviation z * l2 in integer units,
i.e. mu_target = (z l2)^2 / 2. A round releases a sum only if at least m = max(threshold, server.min-replies)
clients' inputs are in it (otherwise it is abandoned), so each client adds mu_i = mu_target / m: every
released sum carries at least the target, and the ledger records what it carried, U mu_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import FedtuneError
from fedtune.model.share import sent_keys
from fedtune.privacy.skellam import SkellamEvent
from fedtune.wire.keys import MAX_MODULUS_BITS

#: Conditional rounding redraws with probability at most beta (Kairouz et al.'s experiments use e^-0.5).
BETA = math.exp(-0.5)
#: The modulus leaves room for this many standard deviations of the largest possible noise sum.
TAIL_SIGMAS = 8.0
#: numpy's Poisson sampler computes in float64, whose integers are exact up to 2^53: keep means well below.
MAX_SHARE_MU = 2.0**44
MAX_ROUNDING_TRIES = 1000


@dataclass(frozen=True)
class Calibration:
    """One round's integer scale, sensitivities and noise (integer units)."""

    scale: float
    """Integer units per unit of delta: S / C."""
    l2: float
    """L2 sensitivity: the largest L2 norm of one client's rounded vector."""
    l1: float
    """L1 sensitivity: min(l2^2, sqrt(d) l2)."""
    mu_target: float
    """Sk(mu, mu) parameter every released sum carries at least: (z l2)^2 / 2."""
    min_survivors: int
    """m: the fewest clients whose inputs a released sum can hold."""

    @property
    def mu_share(self) -> float:
        """Each client's share: mu_target / m."""
        return self.mu_target / self.min_survivors

    def event(self, survivors: int) -> SkellamEvent:
        """The release of a sum holding ``survivors`` clients' inputs (and so their noise shares)."""
        return SkellamEvent(self.l1, self.l2, survivors * self.mu_share, 1)

    def target_event(self) -> SkellamEvent:
        """The least noise a released sum can carry (every round's worst case)."""
        return SkellamEvent(self.l1, self.l2, self.mu_target, 1)

    def noise_std(self, survivors: int) -> float:
        """Standard deviation of the noise on each entry of the dequantized sum (units of the delta)."""
        return math.sqrt(2 * survivors * self.mu_share) / self.scale

    def modulus_need(self, n_clients: int) -> int:
        """Bits b such that the sum of ``n_clients`` inputs and noise shares stays within [-2^(b-1), 2^(b-1))
        but for a tail of ``TAIL_SIGMAS`` standard deviations (a wrap would spoil the sum, not the privacy)."""
        need = n_clients * math.floor(self.l2) + TAIL_SIGMAS * math.sqrt(2 * n_clients * self.mu_share)
        return math.ceil(need).bit_length() + 1


def rounding_bound(scaled_clip: float, length: int) -> float:
    """l2: the L2 norm conditional rounding guarantees for a vector of norm <= ``scaled_clip``."""
    sure = (scaled_clip + math.sqrt(length)) ** 2
    likely = scaled_clip**2 + length / 4 + math.sqrt(2 * math.log(1 / BETA)) * (scaled_clip + math.sqrt(length) / 2)
    return math.sqrt(min(sure, likely))


def sensitivity(cfg: RunConfig, length: int) -> tuple[float, float, float]:
    """(scale, l1, l2) for ``length`` entries: C maps to S = 2^(quant-bits - 1) integer units."""
    s = float(1 << (cfg.secagg.quant_bits - 1))
    l2 = rounding_bound(s, length)
    return s / cfg.privacy.clip_norm, min(l2**2, math.sqrt(length) * l2), l2


def target_event(cfg: RunConfig, noise_multiplier: float, length: int) -> SkellamEvent:
    """The least noise a round releases with ``noise_multiplier`` z: Sk(mu) with std z * l2."""
    _, l1, l2 = sensitivity(cfg, length)
    return SkellamEvent(l1, l2, (max(noise_multiplier, 0.0) * l2) ** 2 / 2, 1)


def calibrate(cfg: RunConfig, length: int, threshold: int) -> Calibration:
    """The round's calibration for ``length`` entries and SecAgg+ threshold ``threshold``."""
    scale, l1, l2 = sensitivity(cfg, length)
    target = target_event(cfg, cfg.privacy.noise_multiplier, length)
    return Calibration(scale, l2, l1, target.mu, max(threshold, cfg.server.min_replies, 2))


def problems(cfg: RunConfig, length: int, n_clients: int, threshold: int) -> list[str]:
    """Why the round's noise cannot travel exactly (empty when it can)."""
    cal = calibrate(cfg, length, threshold)
    out = []
    bits = cal.modulus_need(n_clients)
    if bits > MAX_MODULUS_BITS:
        out.append(
            f"`privacy.mechanism` = distributed with `secagg.quant-bits` = {cfg.secagg.quant_bits}, "
            f"`privacy.noise-multiplier` = {cfg.privacy.noise_multiplier:.4g} and {n_clients} clients needs a modulus "
            f"of 2^{bits}, more than the 2^{MAX_MODULUS_BITS} on the wire; lower `secagg.quant-bits`."
        )
    if cal.mu_share > MAX_SHARE_MU:
        out.append(
            f"`privacy.mechanism` = distributed: each noise share Sk({cal.mu_share:.3g}) is too large to sample "
            "exactly in float64; lower `secagg.quant-bits`."
        )
    return out


def encode(values: np.ndarray, clip_norm: float, cal: Calibration, rng: np.random.Generator) -> np.ndarray:
    """``values`` (float, (d,)) clipped to L2 <= ``clip_norm``, scaled and conditionally rounded: int64 (d,)
    with L2 norm <= ``cal.l2``. ``rng`` supplies only the rounding dither (the noise protects, not this)."""
    if not np.all(np.isfinite(values)):
        raise ValueError("cannot encode non-finite values (NaN or inf).")
    x = values.astype(np.float64)
    norm = float(np.linalg.norm(x))
    if norm > clip_norm:
        x = x * (clip_norm / norm)
    x *= cal.scale
    limit = math.floor(cal.l2**2)
    for _ in range(MAX_ROUNDING_TRIES):
        v = np.floor(x + rng.random(x.shape)).astype(np.int64)
        if int(np.dot(v, v)) <= limit:
            return v
    raise ValueError(f"conditional rounding exceeded L2 {cal.l2:.6g} {MAX_ROUNDING_TRIES} times (norm {norm:.6g})")


def noise_share(length: int, mu: float, rng: np.random.Generator) -> np.ndarray:
    """One client's Sk(mu, mu) share, int64 (length,). ``rng`` must be seeded from OS entropy."""
    return rng.poisson(mu, length).astype(np.int64) - rng.poisson(mu, length).astype(np.int64)


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers modulo 2^``bits``, as uint32 (what SecAgg+ masks)."""
    return np.mod(values.astype(np.int64), 1 << bits).astype(np.uint32)


def from_ring(total: np.ndarray, bits: int) -> np.ndarray:
    """The signed sum in [-2^(bits-1), 2^(bits-1)) of values that ``to_ring`` encoded, int64."""
    signed = total.astype(np.int64)
    signed[signed >= 1 << (bits - 1)] -= 1 << bits
    return signed


class NoisedMean:
    """``distributed``'s aggregator: the SecAgg+ sum that already carries the survivors' noise shares,
    over the fixed ``denominator``; every site has weight 1, as under ``central``."""

    def __init__(self, denominator: float) -> None:
        self.denominator = denominator
        self._sum: Arrays = {}

    def add(self, delta: Arrays, weight: float, *, rank: int | None = None, under_clip: bool = False) -> None:
        raise FedtuneError("`privacy.mechanism` = distributed takes only a secure sum, never one update")

    def add_sum(self, total: Arrays, parts: Sequence[tuple[float, int]]) -> None:
        for k, v in total.items():
            self._sum[k] = self._sum[k] + v if k in self._sum else np.array(v, dtype=np.float64)

    def result(self) -> Arrays:
        return {k: (v / self.denominator).astype(np.float32) for k, v in self._sum.items()}

    def metrics(self) -> dict[str, float]:
        return {}


def adapter_length(cfg: RunConfig, arrays: Arrays) -> int:
    """Entries of the flat vector a client sends under SecAgg+ (only B under FFA-LoRA)."""
    return sum(int(arrays[k].size) for k in sent_keys(arrays, cfg.lora))
