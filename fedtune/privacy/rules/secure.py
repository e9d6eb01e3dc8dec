"""Plan-checker rules for secure aggregation: the server sees only the sum, and SecAgg+'s settings must
work for every sample a round can draw."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.config.plan import Plan, group_rounds
from fedtune.core.errors import ConfigError
from fedtune.privacy.secagg import flat
from fedtune.privacy.secagg import settings as secagg_settings
from fedtune.privacy.secagg.protocols import PROTOCOLS, secure
from fedtune.strategies import STRATEGIES


def _protocol_known(cfg: RunConfig) -> list[str]:
    try:
        PROTOCOLS.get(cfg.secagg.protocol)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _secagg_composition(cfg: RunConfig) -> list[str]:
    """Under secure aggregation the server sees only the sum, so nothing may need one client's update."""
    if not secure(cfg):
        return []
    why = f"`secagg.protocol` = {cfg.secagg.protocol} reveals only the sum of the deltas"
    out = []
    if cfg.strategy.name in STRATEGIES and STRATEGIES.get(cfg.strategy.name).individual_updates:
        out.append(f"{why}, and `strategy.name` = {cfg.strategy.name} needs each update; use a fedavg-family strategy.")
    if cfg.privacy.clip_on == "server":
        out.append(f"{why}, so the server cannot clip each one (`privacy.clip-on` = server); clip at the client.")
    if cfg.privacy.adaptive_clip:
        out.append(
            f"{why}; `privacy.adaptive-clip` needs each client's clipped bit in the clear; use a fixed "
            "`privacy.clip-norm`."
        )
    if cfg.server.max_update_norm > 0:
        out.append(f"{why}, so `server.max-update-norm` cannot check one update; set it to 0.")
    return out


def _sample_sizes(cfg: RunConfig) -> list[int]:
    """The smallest (and any fixed) number of clients a round samples."""
    counts = {cfg.server.min_clients}
    if cfg.server.sampling == "fixed" and cfg.server.num_train:
        counts.add(max(cfg.server.min_clients, cfg.server.num_train))
    return sorted(counts)


def _secagg_params(cfg: RunConfig) -> list[str]:
    """The settings must work for the smallest (and any fixed) number of clients a round samples."""
    if cfg.secagg.protocol not in PROTOCOLS:
        return []
    protocol = PROTOCOLS.get(cfg.secagg.protocol)
    return [
        f"`secagg.*` with {n} sampled client(s) (`server.min-clients`/`server.num-train`): {text}"
        for n in _sample_sizes(cfg)
        for text in protocol.problems(cfg, n)
    ]


def _secagg_rank_bands(cfg: RunConfig) -> list[str]:
    """Mixed ranks: the server divides each entry by the sites that train it, so the components r_k+1..r_(k+1)
    are the sum over the sites of rank >= r_(k+1) alone; any sample must hold 0 or at least t of them."""
    ranks = cfg.simulation.ranks()
    if not secure(cfg) or not ranks or cfg.peft.method != "lora":
        return []
    sites = cfg.simulation.num_supernodes
    cycled = [ranks[i % len(ranks)] for i in range(sites)]
    out = []
    for n in _sample_sizes(cfg):
        drawn = min(n, sites)  # what the server samples, and resolves t for
        t = secagg_settings.threshold(cfg, drawn)
        # a sample of `drawn` of the sites holds between max(0, drawn - (sites - c)) and c of a band's c sites
        thin = [(a, b, max(1, drawn - (sites - c))) for a, b, c in flat.bands(cycled)]
        thin = [(a, b, few) for a, b, few in thin if few < t]
        if thin:
            where = ", ".join(f"{a}..{b} trained by only {few}" for a, b, few in thin)
            out.append(
                f"`simulation.site-ranks` = {cfg.simulation.site_ranks} over {sites} sites with {drawn} sampled "
                f"client(s) (`server.min-clients`/`server.num-train`): a sample can have LoRA components {where} "
                f"site(s), fewer than `secagg.threshold` = {t}, and the unmasked sum would show their update there; "
                f"every rank band needs 0 or >= t sites of any sample (raise `server.min-clients`, or use fewer ranks)."
            )
    return out


def compression_vs_secagg(cfg: RunConfig) -> list[str]:
    """SecAgg+ quantizes each masked update to fixed point itself; a second encoding of the masked
    vector would break the modular sum, and one of the clear delta would need the server to see it."""
    if not secure(cfg) or cfg.compression.uplink == "none":
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
    rounds = [r for r, cfg in plan.rounds() if secure(cfg)]
    if not rounds:
        return []
    text = (
        "`communication.budget-mb` cannot project the key and share exchanges of `secagg.protocol` = secagg; "
        "drop the budget or secure aggregation."
    )
    return group_rounds([(r, text) for r in rounds])


RULES = [_protocol_known, _secagg_composition, _secagg_params, _secagg_rank_bands, compression_vs_secagg]
PLAN_RULES = [budget_vs_secagg]
