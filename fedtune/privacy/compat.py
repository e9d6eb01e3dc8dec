"""The plan checker: the one place every whole-run rule runs, before round 1, reporting every problem.

Rules live by concern in ``fedtune.privacy.rules`` (training, dp, secure). Each round rule looks at one
round's config (from :meth:`Plan.rounds`, the one walk over the plan) and returns problem texts naming
the key; the checker groups identical problems over consecutive rounds ("rounds 4-20: ...") and raises
them together. Plan rules see the whole plan (one DP unit per run, budgets). Fact rules need what only
the loaded model tells (the adapter's size, the solved noise): the server runs them once it has both.
A site runs the round rules on its own config (its node settings over the spec): :func:`check_round`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedtune.config import RunConfig
from fedtune.config.plan import Plan, group_rounds
from fedtune.core.arrays import Arrays
from fedtune.core.errors import IncompatibleComponentsError
from fedtune.privacy import distributed
from fedtune.privacy.distributed import adapter_length
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.privacy.rounds import PrivacyState, round_config
from fedtune.privacy.rules import asynchronous, dp, outputs, personal, secure, training
from fedtune.privacy.secagg import settings as secagg_settings

Rule = Callable[[RunConfig], list[str]]
PlanRule = Callable[[Plan], list[str]]


@dataclass(frozen=True)
class Facts:
    """What the server knows once the model is loaded: the global adapter and the solved noise multiplier."""

    arrays: Arrays
    solved: float | None


FactRule = Callable[[Plan, Facts], list[tuple[int, str]]]


def _distributed_fits(plan: Plan, facts: Facts) -> list[tuple[int, str]]:
    """A ``distributed`` round's noise must travel exactly with the fewest (and the fixed number of)
    clients it can sample; that needs the adapter's length and the solved z."""
    found = []
    for rnd, planned in plan.rounds():
        cfg = round_config(planned, PrivacyState.new(), facts.solved)
        if not MECHANISMS.get(cfg.privacy.mechanism).noise_in_sum:
            continue
        length = adapter_length(cfg, facts.arrays)
        counts = {cfg.server.min_clients, max(cfg.server.min_clients, cfg.server.num_train)}
        for n in sorted(counts):
            threshold = secagg_settings.resolve(cfg, max(n, 2)).threshold
            found += [(rnd, text) for text in distributed.problems(cfg, length, n, threshold)]
    return found


RULES: list[Rule] = [*training.RULES, *dp.RULES, *secure.RULES, *personal.RULES, *asynchronous.RULES]
PLAN_RULES: list[PlanRule] = [
    *dp.PLAN_RULES,
    *secure.PLAN_RULES,
    *personal.PLAN_RULES,
    *asynchronous.PLAN_RULES,
    *outputs.PLAN_RULES,
]
FACT_RULES: list[FactRule] = [_distributed_fits]


def problems(plan: Plan, facts: Facts | None = None) -> list[str]:
    """Every reason ``plan`` cannot run, grouped by round range; empty when it can. With ``facts``,
    the rules that need the loaded model run too."""
    found = [(rnd, text) for rnd, cfg in plan.rounds() for rule in RULES for text in rule(cfg)]
    if facts is not None:
        found += [item for rule in FACT_RULES for item in rule(plan, facts)]
    return group_rounds(found) + [text for rule in PLAN_RULES for text in rule(plan)]


def check(plan: Plan, facts: Facts | None = None) -> None:
    """Raise one error listing every problem :func:`problems` finds."""
    found = problems(plan, facts)
    if found:
        raise IncompatibleComponentsError(" | ".join(found))


def check_round(cfg: RunConfig) -> None:
    """Raise one error listing every problem of one round's config (a site's settings over the spec)."""
    found = [text for rule in RULES for text in rule(cfg)]
    if found:
        raise IncompatibleComponentsError(" | ".join(found))
