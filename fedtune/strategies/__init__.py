"""Aggregation strategies, registered by the name ``strategy.name`` selects.

Each name pairs an aggregator (how deltas are combined) with a server optimizer (how the combined
delta moves the global adapter).
"""

from fedtune.config import StrategyConfig
from fedtune.core.arrays import Arrays
from fedtune.core.registry import Registry
from fedtune.strategies.aggregators import Krum, Median, MultiKrum, TrimmedMean, WeightedMean
from fedtune.strategies.base import Aggregator, OptimizerFactory, ServerOptimizer, StrategySpec
from fedtune.strategies.exact import ExactLoRA
from fedtune.strategies.fedopt import FedAdagrad, FedAdam, FedYogi, ServerMomentum, ServerSGD

OPTIMIZERS: Registry[OptimizerFactory] = Registry("server optimizer")
_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": ServerSGD,
    "momentum": ServerMomentum,
    "adam": FedAdam,
    "yogi": FedYogi,
    "adagrad": FedAdagrad,
}
for _name, _factory in _OPTIMIZERS.items():
    OPTIMIZERS.register(_name)(_factory)

STRATEGIES: Registry[StrategySpec] = Registry("strategy.name")
for _name, _spec in {
    "fedavg": StrategySpec(WeightedMean, "sgd"),
    "fedavgm": StrategySpec(WeightedMean, "momentum"),
    "fedadam": StrategySpec(WeightedMean, "adam"),
    "fedyogi": StrategySpec(WeightedMean, "yogi"),
    "fedadagrad": StrategySpec(WeightedMean, "adagrad"),
    "fedprox": StrategySpec(WeightedMean, "sgd", proximal=True),
    "median": StrategySpec(Median, "sgd", individual_updates=True),
    "trimmed-mean": StrategySpec(TrimmedMean, "sgd", individual_updates=True),
    "krum": StrategySpec(Krum, "sgd", individual_updates=True),
    "multi-krum": StrategySpec(MultiKrum, "sgd", individual_updates=True),
    "exact": StrategySpec(ExactLoRA, "sgd", individual_updates=True, lora_only=True),
}.items():
    STRATEGIES.register(_name)(_spec)


def make_aggregator(cfg: StrategyConfig, global_arrays: Arrays) -> Aggregator:
    """A fresh aggregator for one round of ``strategy.name``."""
    return STRATEGIES.get(cfg.name).aggregator(cfg, global_arrays)


def make_optimizer(cfg: StrategyConfig) -> ServerOptimizer:
    """The server optimizer ``strategy.name`` uses."""
    return OPTIMIZERS.get(STRATEGIES.get(cfg.name).optimizer)(cfg)


__all__ = [
    "OPTIMIZERS",
    "STRATEGIES",
    "Aggregator",
    "ServerOptimizer",
    "StrategySpec",
    "make_aggregator",
    "make_optimizer",
]
