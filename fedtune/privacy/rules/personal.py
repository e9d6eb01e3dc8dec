"""Plan-checker rules for what a LoRA site trains and sends: FedSA-LoRA (``lora.share = a``), local
adaptation (``personalize.local-steps``), ``lora.freeze-b`` and RoLoRA (``lora.alternate``)."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.strategies import STRATEGIES

SHARE_A = "`lora.share` = a (FedSA-LoRA) sends only the A matrices"


def share_a(cfg: RunConfig) -> list[str]:
    """What FedSA-LoRA sends (A only) must be something the round trains and aggregates."""
    if cfg.lora.share != "a":
        return []
    out = []
    if cfg.peft.method != "lora":
        out.append(f"{SHARE_A} of a LoRA adapter; it needs `peft.method` = lora, got {cfg.peft.method}.")
    if cfg.lora.freeze_a:
        out.append(
            f"{SHARE_A}, which `lora.freeze-a` (FFA-LoRA) keeps fixed: no site would send anything; use one of them."
        )
    if cfg.strategy.name in STRATEGIES and STRATEGIES.get(cfg.strategy.name).lora_only:
        out.append(
            f"{SHARE_A} and keeps each site's B, and `strategy.name` = {cfg.strategy.name} needs both; "
            "use a fedavg-family strategy."
        )
    return out


def local_steps_vs_dp(plan: Plan) -> list[str]:
    """Local adaptation trains without DP-SGD, so it cannot run where sites account for each example."""
    if plan.for_round(plan.base.num_server_rounds).personalize.local_steps == 0:  # it runs after the last round
        return []
    names = {cfg.privacy.mechanism for cfg in plan.configs()}
    if any(n in MECHANISMS and MECHANISMS.get(n).site_ledger for n in names):
        return [
            "`personalize.local-steps` trains each site's personal adapter without DP-SGD, outside the "
            "sample-level guarantee of `privacy.mechanism` = dp-sgd; set it to 0."
        ]
    return []


ALTERNATE = "`lora.alternate` (RoLoRA) freezes A in odd rounds and B in even rounds"


def freeze_b(cfg: RunConfig) -> list[str]:
    """``lora.freeze-b`` set by the user (``lora.alternate`` sets it itself, see :func:`alternate`)."""
    if not cfg.lora.freeze_b or cfg.lora.alternate:
        return []
    out = []
    if cfg.peft.method != "lora":
        out.append(f"`lora.freeze-b` needs `peft.method` = lora, got {cfg.peft.method}.")
    if cfg.lora.freeze_a:
        out.append("`lora.freeze-a` and `lora.freeze-b` together freeze the whole adapter; use one of them.")
    if cfg.lora.share == "a":
        out.append(f"{SHARE_A} and keeps B, which `lora.freeze-b` fixes at its initial zeros; drop `lora.freeze-b`.")
    if cfg.strategy.name in STRATEGIES and STRATEGIES.get(cfg.strategy.name).lora_only:
        out.append(f"`strategy.name` = {cfg.strategy.name} re-factorizes B, which `lora.freeze-b` keeps fixed.")
    return out


def alternate(plan: Plan) -> list[str]:
    """RoLoRA sets ``lora.freeze-a`` / ``lora.freeze-b`` itself in the rounds that alternate, and needs
    both factors sent and averaged there (``lora.freeze-*`` and ``lora.share`` are fixed for the run)."""
    rounds = [r for r, c in plan.rounds() if c.lora.alternate]
    if not rounds:
        return []
    cfg = plan.base
    out = []
    if cfg.peft.method != "lora":
        out.append(f"{ALTERNATE}; it needs `peft.method` = lora, got {cfg.peft.method}.")
    if cfg.lora.freeze_a or cfg.lora.freeze_b:
        out.append(f"{ALTERNATE} itself; unset `lora.freeze-a` and `lora.freeze-b`.")
    if cfg.lora.share == "a":
        out.append(f"{ALTERNATE}, and {SHARE_A}: its B rounds would send nothing; use one of them.")
    names = sorted({n for r in rounds if (n := plan.for_round(r).strategy.name) in STRATEGIES})
    for name in names:
        if STRATEGIES.get(name).lora_only:
            out.append(f"{ALTERNATE}, and `strategy.name` = {name} re-factorizes both; use a fedavg-family strategy.")
    return out


RULES = [share_a, freeze_b]
PLAN_RULES = [local_steps_vs_dp, alternate]
