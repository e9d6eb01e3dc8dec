"""The plan checker: validates every round's settings before round 1 and reports every problem.

Each rule looks at one round's config and returns a problem text naming the key; the checker
groups identical problems over consecutive rounds ("rounds 4-20: ...") and raises them together.
The privacy and secure-aggregation rules join the same list.
"""

from __future__ import annotations

from collections.abc import Callable

from fedtune.config import RunConfig
from fedtune.errors import ConfigError, IncompatibleComponentsError
from fedtune.strategies import STRATEGIES
from fedtune.strategies.plan import Plan, group_rounds

Rule = Callable[[RunConfig], list[str]]


def _strategy_known(cfg: RunConfig) -> list[str]:
    try:
        STRATEGIES.get(cfg.strategy.name)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _krum_quorum(cfg: RunConfig) -> list[str]:
    if cfg.strategy.name not in ("krum", "multi-krum"):
        return []
    need = cfg.strategy.krum_byzantine + 3
    if cfg.server.min_clients < need:
        return [
            f"`strategy.name` = {cfg.strategy.name} with `strategy.krum-byzantine` = "
            f"{cfg.strategy.krum_byzantine} needs `server.min-clients` >= {need}, "
            f"got {cfg.server.min_clients}."
        ]
    return []


def _trimmed_keeps_some(cfg: RunConfig) -> list[str]:
    if cfg.strategy.name == "trimmed-mean" and cfg.strategy.trim_fraction * cfg.server.min_clients < 1:
        return [
            f"`strategy.trim-fraction` = {cfg.strategy.trim_fraction} trims nothing with "
            f"`server.min-clients` = {cfg.server.min_clients}; raise one of them."
        ]
    return []


def _exact_vs_ffa(cfg: RunConfig) -> list[str]:
    if cfg.strategy.name == "exact" and cfg.lora.freeze_a:
        return [
            "`strategy.name` = exact re-factorizes A, which `lora.freeze-a` keeps fixed; with FFA-LoRA "
            "plain fedavg is already exact."
        ]
    return []


def _hetero_ranks(cfg: RunConfig) -> list[str]:
    if not cfg.simulation.site_ranks:
        return []
    spec = STRATEGIES.get(cfg.strategy.name) if cfg.strategy.name in STRATEGIES else None
    if spec is not None and spec.individual_updates:
        return [
            f"`strategy.name` = {cfg.strategy.name} has no defined rule for heterogeneous ranks "
            "(`simulation.site-ranks`); use a fedavg-family strategy."
        ]
    return []


RULES: list[Rule] = [_strategy_known, _krum_quorum, _trimmed_keeps_some, _exact_vs_ffa, _hetero_ranks]


def problems(plan: Plan) -> list[str]:
    """Every reason ``plan`` cannot run, grouped by round range; empty when it can."""
    found = [
        (rnd, text)
        for rnd in range(1, plan.base.num_server_rounds + 1)
        for rule in RULES
        for text in rule(plan.for_round(rnd))
    ]
    return group_rounds(found)


def check(plan: Plan) -> None:
    """Raise one error listing every problem :func:`problems` finds."""
    found = problems(plan)
    if found:
        raise IncompatibleComponentsError(" | ".join(found))
