"""Staleness weights of buffered asynchronous rounds (``server.mode = async``, ``strategy.staleness``).

A reply's staleness s is the number of global versions the server published between the version the
site started from and the one the reply is aggregated into. FedBuff (Nguyen et al. 2022,
https://arxiv.org/abs/2106.06639) scales each buffered delta by s(staleness) before averaging; the
functions are FedAsync's (Xie et al. 2019, https://arxiv.org/abs/1903.03934, section 5.2):

- ``constant``: 1;
- ``polynomial``: (1 + s)^-a (FedBuff uses a = 0.5);
- ``hinge``: 1 while s <= b, then 1 / (1 + a (s - b)).

a is ``strategy.staleness-exponent`` and b ``strategy.staleness-cutoff``.
"""

from __future__ import annotations

from collections.abc import Callable

from fedtune.config import StrategyConfig
from fedtune.core.registry import Registry

Weight = Callable[[int, StrategyConfig], float]


def constant(staleness: int, cfg: StrategyConfig) -> float:
    """Every reply counts fully, however stale."""
    return 1.0


def polynomial(staleness: int, cfg: StrategyConfig) -> float:
    """(1 + s)^-a with a = ``strategy.staleness-exponent``."""
    return float((1.0 + staleness) ** -cfg.staleness_exponent)


def hinge(staleness: int, cfg: StrategyConfig) -> float:
    """1 up to s = b (``strategy.staleness-cutoff``), then 1 / (1 + a (s - b)), a = ``strategy.staleness-exponent``."""
    if staleness <= cfg.staleness_cutoff:
        return 1.0
    return 1.0 / (1.0 + cfg.staleness_exponent * (staleness - cfg.staleness_cutoff))


STALENESS: Registry[Weight] = Registry("strategy.staleness")
for _name, _weight in {"constant": constant, "polynomial": polynomial, "hinge": hinge}.items():
    STALENESS.register(_name)(_weight)


def staleness_weight(staleness: int, cfg: StrategyConfig) -> float:
    """The factor ``strategy.staleness`` gives a reply of ``staleness`` (>= 0) versions."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return STALENESS.get(cfg.staleness)(staleness, cfg)
