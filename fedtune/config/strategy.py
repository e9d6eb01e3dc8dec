"""Config section ``strategy.*``: aggregation rule and server optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedtune.config.fields import require


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """``strategy.*``: how the server combines client deltas and steps the global adapter."""

    name: str = "fedavg"
    """Aggregation rule (see ``fedtune.strategies``)."""
    server_lr: float = 1.0
    """Server learning rate applied to the aggregated delta (the pseudo-gradient's step size)."""
    weighting: Literal["examples", "uniform"] = "examples"
    """Weight each client by its number of training examples, or equally."""
    sum_dtype: Literal["float64", "float32"] = "float64"
    """Dtype of the running sum of deltas: float64 gives the same result whatever order replies
    arrive in (reproducible runs and resumes); float32 is faster for very large federations."""
    momentum: float = 0.9
    """Server momentum of ``fedavgm``."""
    beta1: float = 0.9
    """First-moment decay of ``fedadam`` / ``fedyogi``."""
    beta2: float = 0.99
    """Second-moment decay of ``fedadam`` / ``fedyogi``."""
    tau: float = 1e-3
    """Adaptivity (epsilon) of ``fedadam`` / ``fedyogi`` / ``fedadagrad``."""
    proximal_mu: float = 0.01
    """Proximal coefficient of ``fedprox``: clients add mu/2 * ||w - w_global||^2 to their loss."""
    trim_fraction: float = 0.1
    """Share of the largest and of the smallest values ``trimmed-mean`` drops per coordinate."""
    krum_byzantine: int = 1
    """Number of poisoned clients ``krum`` / ``multi-krum`` tolerate (f)."""
    multi_krum_select: int = 0
    """Updates ``multi-krum`` averages; 0 means n - f."""
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    """``server.mode = async``: how a reply of staleness s (versions published since its site started)
    is weighted down: ``constant`` 1; ``polynomial`` (1 + s)^-a; ``hinge`` 1 up to s = b, then
    1 / (1 + a (s - b)) (Xie et al. 2019, FedAsync; see ``fedtune.strategies.staleness``)."""
    staleness_exponent: float = 0.5
    """a of ``strategy.staleness``: the exponent of ``polynomial`` (FedBuff's 0.5), the slope of ``hinge``."""
    staleness_cutoff: int = 4
    """b of ``strategy.staleness = hinge``: the staleness up to which a reply keeps its full weight."""

    def __post_init__(self) -> None:
        require(self.server_lr > 0, "strategy.server-lr", f"must be > 0, got {self.server_lr}.")
        require(0 <= self.momentum < 1, "strategy.momentum", f"must be in [0, 1), got {self.momentum}.")
        require(0 <= self.beta1 < 1, "strategy.beta1", f"must be in [0, 1), got {self.beta1}.")
        require(0 <= self.beta2 < 1, "strategy.beta2", f"must be in [0, 1), got {self.beta2}.")
        require(self.tau > 0, "strategy.tau", f"must be > 0, got {self.tau}.")
        require(self.proximal_mu >= 0, "strategy.proximal-mu", "must be >= 0.")
        require(
            0 <= self.trim_fraction < 0.5,
            "strategy.trim-fraction",
            f"must be in [0, 0.5), got {self.trim_fraction}.",
        )
        require(self.krum_byzantine >= 0, "strategy.krum-byzantine", "must be >= 0.")
        require(self.multi_krum_select >= 0, "strategy.multi-krum-select", "must be >= 0.")
        require(
            self.staleness_exponent >= 0,
            "strategy.staleness-exponent",
            f"must be >= 0, got {self.staleness_exponent}.",
        )
        require(self.staleness_cutoff >= 0, "strategy.staleness-cutoff", f"must be >= 0, got {self.staleness_cutoff}.")
