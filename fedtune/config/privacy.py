"""Config sections ``privacy.*`` and ``secagg.*``: differential privacy and secure aggregation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedtune.config.fields import require


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """``privacy.*``: differential privacy (see README, "Privacy")."""

    mechanism: str = "none"
    """A registered mechanism (``fedtune.privacy.mechanisms``; the plan checker names the known ones):
    ``none`` (no formal guarantee), ``dp-sgd`` (sample-level, Opacus at each site), ``central``
    (user-level DP-FedAvg: clip, noise on the sum at a trusted server), ``local`` (each client
    clips and noises its own delta) or ``distributed`` (each client adds a Skellam noise share
    inside SecAgg+, so the server sees only the noised sum)."""
    target_epsilon: float = 0.0
    """The budget: per site for ``dp-sgd``, for the federation otherwise; 0 means no budget."""
    delta: float = 1e-5
    """The delta every epsilon is reported at."""
    noise_multiplier: float = -1.0
    """Gaussian noise std in units of the clip norm; -1 solves it from ``privacy.target-epsilon``
    for the planned rounds."""
    clip_norm: float = 1.0
    """C: per-example gradient clip (``dp-sgd``) or per-client delta clip (``central``, ``local``,
    ``distributed``);
    the starting value under adaptive clipping."""
    clip_on: Literal["client", "server"] = "client"
    """Where ``central`` clips deltas: at the client (the server checks the norm) or at the server."""
    adaptive_clip: bool = False
    """``central``: adapt C towards a quantile of the update norms (Andrew et al. 2021)."""
    target_quantile: float = 0.5
    """Adaptive clipping: the share of client updates that should fall under C."""
    clip_lr: float = 0.2
    """Adaptive clipping: the geometric step size of C."""
    clip_count_stddev: float = 0.0
    """Adaptive clipping: noise std on the count of updates under C (each counted as +-1/2, so one
    client moves it by 1/2); must exceed half of ``privacy.noise-multiplier``. 0 means expected
    clients / 20 or the noise multiplier, whichever is larger."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus accountant that turns the privacy events into epsilon."""

    def __post_init__(self) -> None:
        require(self.target_epsilon >= 0, "privacy.target-epsilon", "must be >= 0 (0 means no budget).")
        require(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}.")
        require(
            self.noise_multiplier == -1 or self.noise_multiplier >= 0,
            "privacy.noise-multiplier",
            f"must be >= 0, or -1 to solve it from `privacy.target-epsilon`; got {self.noise_multiplier}.",
        )
        require(self.clip_norm > 0, "privacy.clip-norm", f"must be > 0, got {self.clip_norm}.")
        require(0 < self.target_quantile < 1, "privacy.target-quantile", "must be in (0, 1).")
        require(self.clip_lr > 0, "privacy.clip-lr", "must be > 0.")
        require(self.clip_count_stddev >= 0, "privacy.clip-count-stddev", "must be >= 0.")


@dataclass(frozen=True, kw_only=True)
class SecaggConfig:
    """``secagg.*``: secure aggregation."""

    protocol: str = "none"
    """``none`` sends updates in the clear; ``secagg`` runs SecAgg+ (Bell et al. 2020): the server
    learns only the (weighted) sum of the round's deltas. The registered names are in
    ``fedtune.privacy.secagg.protocols``; the plan checker refuses any other."""
    degree: int = 0
    """Neighbours each client masks with; 0 = auto: the complete graph for up to 16 clients, else an
    even k = 2 * ceil(2 log2 N), O(log N) as Bell et al. suggest. An explicit value must be even."""
    threshold: int = 0
    """Shares needed to rebuild a client's secrets; 0 = a strict majority of its degree + 1 holders."""
    quant_bits: int = 16
    """Fixed-point bits per value; the modulus is 2^(bits + ceil(log2 N)) and must fit 32 bits. Under
    ``privacy.mechanism = distributed`` the clip norm C maps to 2^(bits - 1) integer units and the
    modulus also holds the noise shares."""
    clip: float = 0.0
    """Per-coordinate quantization range [-clip, clip]; 0 = auto: the most an AdamW coordinate can move
    in the round, 3.17 * `train.local-steps` * `train.lr` (plus 4 noise std under `local` DP)."""
    stage_timeout: float = 300.0
    """Seconds each key/share/unmask stage waits for replies (the training stage waits
    `server.round-timeout`)."""

    def __post_init__(self) -> None:
        require(
            self.degree == 0 or (self.degree >= 2 and self.degree % 2 == 0),
            "secagg.degree",
            f"must be 0 (auto) or an even number >= 2 (no odd-degree regular graph on an odd number of clients "
            f"exists), got {self.degree}.",
        )
        require(self.threshold >= 0, "secagg.threshold", f"must be >= 0 (0 = auto), got {self.threshold}.")
        require(1 <= self.quant_bits <= 31, "secagg.quant-bits", f"must be in 1..31, got {self.quant_bits}.")
        require(
            math.isfinite(self.clip) and self.clip >= 0,
            "secagg.clip",
            f"must be a finite number >= 0 (0 = auto), got {self.clip}.",
        )
        require(self.stage_timeout > 0, "secagg.stage-timeout", f"must be > 0, got {self.stage_timeout}.")
