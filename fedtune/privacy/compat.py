"""Checks a whole run config before round 1 and reports every problem at once."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.errors import ConfigError, IncompatibleComponentsError
from fedtune.strategies import STRATEGIES


def problems(cfg: RunConfig) -> list[str]:
    """Every reason ``cfg`` cannot run, each naming its key; empty when it can."""
    found = []
    try:
        STRATEGIES.get(cfg.strategy.name)
    except ConfigError as exc:
        found.append(str(exc))
    return found


def check(cfg: RunConfig) -> None:
    """Raise one error listing every problem :func:`problems` finds."""
    found = problems(cfg)
    if found:
        raise IncompatibleComponentsError(" ".join(found))
