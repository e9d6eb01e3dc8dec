"""Config section ``server.*``: sampling, timeouts and what a round needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedtune.config.fields import require


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """``server.*``: client sampling, timeouts and reply validation."""

    fraction_train: float = 1.0
    """Share of the connected clients sampled each round."""
    num_train: int = 0
    """Clients sampled each round; 0 uses ``server.fraction-train`` instead."""
    sampling: Literal["fixed", "poisson"] = "fixed"
    """``fixed``: a seeded choice of that many clients. ``poisson``: each connected client joins
    independently with probability ``server.fraction-train`` (what DP amplification assumes)."""
    min_clients: int = 2
    """Clients that must be connected (and sampled) before a round starts."""
    min_replies: int = 1
    """Valid replies needed to update the global adapter; fewer leaves it unchanged."""
    round_timeout: float = 600.0
    """Seconds to wait for replies in a round."""
    wait_for_clients: float = 300.0
    """Seconds to wait for ``server.min-clients`` clients to connect."""
    max_update_norm: float = 0.0
    """Replies whose delta has a larger L2 norm are rejected; 0 turns the check off."""
    mode: Literal["sync", "async"] = "sync"
    """``sync``: rounds, each waiting for its sampled sites. ``async``: buffered asynchronous rounds
    (FedBuff): sites train all the time, and every ``server.buffer-size`` replies make a new global
    version; ``num-server-rounds`` then counts versions."""
    concurrency: int = 0
    """``async``: sites training at once; 0 means every connected site."""
    buffer_size: int = 2
    """``async``: replies aggregated into each new global version (FedBuff's K)."""
    max_staleness: int = 0
    """``async``: a reply started more than this many versions ago is dropped (and logged); 0 keeps every one."""

    def __post_init__(self) -> None:
        require(
            0 < self.fraction_train <= 1,
            "server.fraction-train",
            f"must be in (0, 1], got {self.fraction_train}.",
        )
        require(self.min_clients >= 1, "server.min-clients", "must be >= 1.")
        require(self.num_train >= 0, "server.num-train", "must be >= 0.")
        require(self.min_replies >= 1, "server.min-replies", "must be >= 1.")
        require(self.round_timeout > 0, "server.round-timeout", "must be > 0.")
        require(self.max_update_norm >= 0, "server.max-update-norm", "must be >= 0.")
        require(self.concurrency >= 0, "server.concurrency", f"must be >= 0, got {self.concurrency}.")
        require(self.buffer_size >= 1, "server.buffer-size", f"must be >= 1, got {self.buffer_size}.")
        require(self.max_staleness >= 0, "server.max-staleness", f"must be >= 0, got {self.max_staleness}.")
