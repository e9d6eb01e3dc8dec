"""Plan-checker rules for personalization: FedSA-LoRA (``lora.share = a``) and local adaptation
(``personalize.local-steps``), joined into ``compat``."""

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
    rounds = range(1, plan.base.num_server_rounds + 1)
    names = {plan.for_round(r).privacy.mechanism for r in rounds}
    if any(n in MECHANISMS and MECHANISMS.get(n).site_ledger for n in names):
        return [
            "`personalize.local-steps` trains each site's personal adapter without DP-SGD, outside the "
            "sample-level guarantee of `privacy.mechanism` = dp-sgd; set it to 0."
        ]
    return []
