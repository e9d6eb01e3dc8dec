"""The plan checker: validates every round's settings before round 1 and reports every problem.

Each rule looks at one round's config and returns a problem text naming the key; the checker
groups identical problems over consecutive rounds ("rounds 4-20: ...") and raises them together.
The privacy and secure-aggregation rules join the same list.
"""

from __future__ import annotations

from collections.abc import Callable

from fedtune.config import RunConfig
from fedtune.config.plan import Plan, group_rounds
from fedtune.core.errors import ConfigError, IncompatibleComponentsError
from fedtune.model.methods import METHODS
from fedtune.privacy.async_rules import async_composition
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.privacy.secagg import flat
from fedtune.privacy.secagg import settings as secagg_settings
from fedtune.privacy.traffic_rules import budget_vs_secagg, compression_vs_secagg
from fedtune.strategies import STRATEGIES

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


def _method_support(cfg: RunConfig) -> list[str]:
    """What each ``peft.method`` supports: LoRA-only rules and settings (DP-SGD: the mechanism's own rule)."""
    method = cfg.peft.method
    out = []
    if method != "lora":
        if cfg.strategy.name in STRATEGIES and STRATEGIES.get(cfg.strategy.name).lora_only:
            out.append(
                f"`strategy.name` = {cfg.strategy.name} is defined for LoRA adapters only, not `peft.method` = "
                f"{method}; use a fedavg-family or robust strategy."
            )
        if cfg.lora.freeze_a:
            out.append(f"`lora.freeze-a` (FFA-LoRA) needs `peft.method` = lora, got {method}.")
        if cfg.simulation.site_ranks:
            out.append(f"`simulation.site-ranks` (heterogeneous LoRA ranks) needs `peft.method` = lora, got {method}.")
    if not METHODS[method].peft and cfg.model.quantization != "none":
        out.append(
            f"`model.quantization` = {cfg.model.quantization} with `peft.method` = {method}: quantized base weights "
            "cannot be trained or saved as a model; use a PEFT method (QLoRA)."
        )
    return out


def _mechanism_rules(cfg: RunConfig) -> list[str]:
    """The round's mechanism is registered, and its own composition rules hold."""
    try:
        mechanism = MECHANISMS.get(cfg.privacy.mechanism)
    except ConfigError as exc:
        return [str(exc)]
    return mechanism.problems(cfg)


def _central_only_settings(cfg: RunConfig) -> list[str]:
    p = cfg.privacy
    out = []
    tunes = p.mechanism in MECHANISMS and MECHANISMS.get(p.mechanism).tunes_clip
    if not tunes and p.clip_on == "server":
        out.append(f"`privacy.clip-on` = server applies to `privacy.mechanism` = {_tuning()} only.")
    if not tunes and p.adaptive_clip:
        out.append(f"`privacy.adaptive-clip` applies to `privacy.mechanism` = {_tuning()} only.")
    if (
        p.adaptive_clip
        and p.clip_count_stddev > 0
        and p.noise_multiplier > 0
        and 2 * p.clip_count_stddev <= p.noise_multiplier
    ):
        out.append(
            f"`privacy.clip-count-stddev` = {p.clip_count_stddev} must exceed half of `privacy.noise-multiplier` "
            f"= {p.noise_multiplier} (Andrew et al.'s noise split)."
        )
    return out


def _poisson_count(cfg: RunConfig) -> list[str]:
    if cfg.server.sampling == "poisson" and cfg.server.num_train:
        return [
            "`server.num-train` fixes the sample size, which `server.sampling` = poisson does not; "
            "use `server.fraction-train`."
        ]
    return []


def _secagg_composition(cfg: RunConfig) -> list[str]:
    """Under secure aggregation the server sees only the sum, so nothing may need one client's update."""
    if cfg.secagg.protocol == "none":
        return []
    why = "`secagg.protocol` = secagg reveals only the sum of the deltas"
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
    if cfg.secagg.protocol == "none":
        return []
    return [
        f"`secagg.*` with {n} sampled client(s) (`server.min-clients`/`server.num-train`): {text}"
        for n in _sample_sizes(cfg)
        for text in secagg_settings.problems(cfg, n)
    ]


def _secagg_rank_bands(cfg: RunConfig) -> list[str]:
    """Mixed ranks: the server divides each entry by the sites that train it, so the components r_k+1..r_(k+1)
    are the sum over the sites of rank >= r_(k+1) alone; any sample must hold 0 or at least t of them."""
    ranks = cfg.simulation.ranks()
    if cfg.secagg.protocol == "none" or not ranks or cfg.peft.method != "lora":
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


RULES: list[Rule] = [
    _strategy_known,
    _krum_quorum,
    _trimmed_keeps_some,
    _exact_vs_ffa,
    _hetero_ranks,
    _method_support,
    _mechanism_rules,
    _central_only_settings,
    _poisson_count,
    _secagg_composition,
    _secagg_params,
    _secagg_rank_bands,
    compression_vs_secagg,
]


def _dp(name: str) -> bool:
    """``name`` is a registered DP mechanism (an unknown name is reported by :func:`_mechanism_rules`)."""
    return name in MECHANISMS and MECHANISMS.get(name).dp


def _tuning() -> str:
    """The mechanisms whose clip norm the server may set (clip at the server, adaptive clipping)."""
    return " / ".join(n for n in MECHANISMS if MECHANISMS.get(n).tunes_clip)


def _one_guarantee(plan: Plan) -> list[str]:
    """A run has one DP unit; a budget needs every round to be noised."""
    by_round = [(rnd, plan.for_round(rnd).privacy.mechanism) for rnd in range(1, plan.base.num_server_rounds + 1)]
    used = sorted({m for _, m in by_round if _dp(m)})
    target = plan.base.privacy.target_epsilon
    if len(used) > 1:
        return [f"one run uses one DP mechanism (`privacy.mechanism`), this plan mixes {', '.join(used)}."]
    if target > 0 and not used:
        return ["`privacy.target-epsilon` is set but no round uses DP (`privacy.mechanism` = none)."]
    bare = [rnd for rnd, m in by_round if not _dp(m)]
    if target > 0 and bare:
        text = (
            "un-noised updates (`privacy.mechanism` = none) make epsilon infinite, so `privacy.target-epsilon` "
            "cannot hold; noise every round or drop the target."
        )
        return group_rounds([(r, text) for r in bare])
    return []


PLAN_RULES: list[Callable[[Plan], list[str]]] = [_one_guarantee, budget_vs_secagg, async_composition]


def problems(plan: Plan) -> list[str]:
    """Every reason ``plan`` cannot run, grouped by round range; empty when it can."""
    found = [
        (rnd, text)
        for rnd in range(1, plan.base.num_server_rounds + 1)
        for rule in RULES
        for text in rule(plan.for_round(rnd))
    ]
    return group_rounds(found) + [text for rule in PLAN_RULES for text in rule(plan)]


def check(plan: Plan) -> None:
    """Raise one error listing every problem :func:`problems` finds."""
    found = problems(plan)
    if found:
        raise IncompatibleComponentsError(" | ".join(found))
