"""Aggregation rules, registered by the name ``strategy.name`` selects."""

from fedtune.registry import Registry
from fedtune.strategies.base import Strategy, StrategyFactory
from fedtune.strategies.fedavg import FedAvg

STRATEGIES: Registry[StrategyFactory] = Registry("strategy.name")
STRATEGIES.register("fedavg")(FedAvg)

__all__ = ["STRATEGIES", "Strategy", "StrategyFactory"]
