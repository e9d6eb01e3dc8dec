"""FedAvg on adapter deltas (McMahan et al. 2017, https://arxiv.org/abs/1602.05629)."""

from __future__ import annotations

import numpy as np

from fedtune.config import StrategyConfig
from fedtune.strategies.base import Arrays


class WeightedMean:
    """Running weighted mean of array dicts: memory is one accumulator, not one copy per client."""

    def __init__(self) -> None:
        self._sum: Arrays = {}
        self._weight = 0.0

    def add(self, arrays: Arrays, weight: float) -> None:
        """Accumulate ``weight * arrays`` in float64."""
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if not self._sum:
            self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in arrays.items()}
        for k, v in arrays.items():
            self._sum[k] += weight * v
        self._weight += weight

    def result(self) -> Arrays:
        """sum_i w_i x_i / sum_i w_i, as float32."""
        if self._weight <= 0:
            raise ValueError("no weight was added")
        return {k: (v / self._weight).astype(np.float32) for k, v in self._sum.items()}


class FedAvg:
    """Weighted mean of the deltas, applied with server learning rate ``strategy.server-lr``."""

    def __init__(self, cfg: StrategyConfig) -> None:
        self.server_lr = cfg.server_lr
        self._mean = WeightedMean()

    def add(self, delta: Arrays, weight: float) -> None:
        self._mean.add(delta, weight)

    def combine(self) -> Arrays:
        return self._mean.result()

    def step(self, global_arrays: Arrays, delta: Arrays) -> Arrays:
        return {k: (v + self.server_lr * delta[k]).astype(np.float32) for k, v in global_arrays.items()}
