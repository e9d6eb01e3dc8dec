"""The aggregation-strategy protocol: combine client deltas, then take a server step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from fedtune.config import StrategyConfig

Arrays = dict[str, np.ndarray]


class Strategy(Protocol):
    """A server-side aggregation rule.

    ``aggregate`` is fed one update at a time, so rules that only need a running sum never hold
    every reply; ``step`` turns the combined delta into the next global adapter.
    """

    def add(self, delta: Arrays, weight: float) -> None:
        """Take one validated client delta with its (non-negative) weight."""

    def combine(self) -> Arrays:
        """The combined delta of everything added this round."""

    def step(self, global_arrays: Arrays, delta: Arrays) -> Arrays:
        """The next global adapter from the current one and the combined delta."""


StrategyFactory = Callable[[StrategyConfig], Strategy]
