"""Plan-checker rules for compressed updates and the communication budget (joined into ``compat``)."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.config.plan import Plan, group_rounds


def compression_vs_secagg(cfg: RunConfig) -> list[str]:
    """SecAgg+ quantizes each masked update to fixed point itself; a second encoding of the masked
    vector would break the modular sum, and one of the clear delta would need the server to see it."""
    if cfg.secagg.protocol == "none" or cfg.compression.uplink == "none":
        return []
    return [
        f"`compression.uplink` = {cfg.compression.uplink} under `secagg.protocol` = secagg: SecAgg+ already sends "
        "each update quantized to `secagg.quant-bits` (lower it to send fewer bytes); set `compression.uplink` = none."
    ]


def budget_vs_secagg(plan: Plan) -> list[str]:
    """The budget projects each round's bytes before it starts; SecAgg+'s key and share exchanges
    depend on who answers each stage, so they have no projection here."""
    if plan.base.communication.budget_mb <= 0:
        return []
    rounds = [r for r in range(1, plan.base.num_server_rounds + 1) if plan.for_round(r).secagg.protocol != "none"]
    if not rounds:
        return []
    text = (
        "`communication.budget-mb` cannot project the key and share exchanges of `secagg.protocol` = secagg; "
        "drop the budget or secure aggregation."
    )
    return group_rounds([(r, text) for r in rounds])
