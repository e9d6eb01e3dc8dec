"""Plan-checker rules for buffered asynchronous rounds (``server.mode = async``).

An async version averages whatever ``server.buffer-size`` replies arrived first, each computed from
an older global version: there is no sampled cohort and no common starting point. What needs either
is refused, each with one line naming why.
"""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.privacy.secagg.protocols import secure
from fedtune.strategies import STRATEGIES

WHY = "`server.mode` = async aggregates the first `server.buffer-size` replies, each from an older version"


def _version_problems(cfg: RunConfig) -> list[str]:
    """What one version's settings ask that an async version cannot give."""
    if cfg.server.mode != "async":
        return []
    out = []
    name = cfg.strategy.name
    if name == "exact":
        out.append(f"{WHY}: `strategy.name` = exact re-factorizes updates that share one global adapter; use fedavg.")
    elif name in STRATEGIES and STRATEGIES.get(name).individual_updates:
        out.append(
            f"{WHY}: the robust rule `strategy.name` = {name} compares a round's updates, which here have no common "
            "start; use a fedavg-family strategy."
        )
    if secure(cfg):
        out.append(
            f"{WHY}: `secagg.protocol` = {cfg.secagg.protocol} (SecAgg+) needs a fixed cohort that sends in one round."
        )
    mechanism = MECHANISMS.get(cfg.privacy.mechanism) if cfg.privacy.mechanism in MECHANISMS else None
    if mechanism is not None and mechanism.dp and not mechanism.site_ledger:
        out.append(
            f"{WHY}: `privacy.mechanism` = {cfg.privacy.mechanism} accounts one release of a sampled cohort per round, "
            "which a version is not (a site may even send twice); use dp-sgd, which each site accounts itself."
        )
    if cfg.eval.federated is True:
        out.append(f"{WHY}: `eval.federated` = true would queue behind the sites' training; evaluate centrally.")
    return out


def _async_budget(plan: Plan) -> list[str]:
    if plan.base.server.mode != "async" or plan.base.communication.budget_mb <= 0:
        return []
    return [f"{WHY}: `communication.budget-mb` projects a sampled round's bytes; drop the budget."]


RULES = [_version_problems]
PLAN_RULES = [_async_budget]
