"""What a strategy is: an aggregator (deltas -> one delta) and a server optimizer (delta -> step).

Reddi et al. 2021 ("Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295) treat
the combined client delta as a pseudo-gradient for a server optimizer; fedtune splits every rule
the same way, so robust aggregators and server optimizers stay independent pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedtune.config import StrategyConfig
from fedtune.core.arrays import Arrays


class Aggregator(Protocol):
    """Combines one round's validated deltas into one delta; a fresh one is made each round.

    Every way a round combines updates sits behind it: the plain weighted mean, the robust rules,
    central DP's noised sum and the sum SecAgg+ unmasks. A reply is folded in with :meth:`add`; a sum
    whose parts the server never sees (SecAgg+) with :meth:`add_sum`, its parts known only by
    (weight, LoRA rank).
    """

    def add(self, delta: Arrays, weight: float, *, rank: int | None = None, under_clip: bool = False) -> None:
        """Take one client's delta (at the global rank, zero-padded from ``rank`` when that is lower)
        with its (non-negative) weight; ``under_clip`` is the site's report that its delta fit under
        the clip norm before clipping (only central DP's adaptive clipping reads it). Raises
        UpdateRejected, before anything is added, when the rule cannot take it."""

    def add_sum(self, total: Arrays, parts: Sequence[tuple[float, int]]) -> None:
        """Take the sum of several deltas, each already multiplied by its weight, known only as
        (weight, LoRA rank) pairs. Raises FedtuneError when the rule needs every update."""

    def result(self) -> Arrays:
        """The combined delta of everything added this round."""

    def metrics(self) -> dict[str, float]:
        """Per-round figures worth recording (e.g. a reconstruction error); may be empty."""


class ServerOptimizer(Protocol):
    """Turns the combined delta into the next global adapter; its state survives rounds."""

    def step(self, global_arrays: Arrays, delta: Arrays) -> Arrays:
        """The next global adapter."""

    def state_dict(self) -> Arrays:
        """Optimizer state as named arrays (checkpointed with the adapter)."""

    def load_state_dict(self, state: Arrays) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass(frozen=True)
class StrategySpec:
    """What a ``strategy.name`` stands for, and what the plan checker needs to know about it."""

    aggregator: Callable[[StrategyConfig, Arrays], Aggregator]
    """Builds the round's aggregator from the config and the current global adapter."""
    optimizer: str
    """Name of the server optimizer in ``OPTIMIZERS``."""
    individual_updates: bool = False
    """Needs each client's update in the clear (so not under secure aggregation)."""
    lora_only: bool = False
    """Defined only for LoRA adapters."""
    proximal: bool = False
    """Clients add a proximal term (FedProx)."""


OptimizerFactory = Callable[[StrategyConfig], ServerOptimizer]
