"""Plan-checker rules for differential privacy: the mechanism's own rules, the settings only some
mechanisms tune, one guarantee per run, and (once the model is loaded) distributed noise that fits."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.config.plan import Plan, group_rounds
from fedtune.core.errors import ConfigError
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.privacy.secagg.protocols import PROTOCOLS, secure


def _mechanism_rules(cfg: RunConfig) -> list[str]:
    """The round's mechanism is registered, and its own composition rules hold."""
    try:
        mechanism = MECHANISMS.get(cfg.privacy.mechanism)
    except ConfigError as exc:
        return [str(exc)]
    return mechanism.problems(cfg)


def _noise_in_a_secure_sum(cfg: RunConfig) -> list[str]:
    """A mechanism whose noise is shared among the clients (``noise_in_sum``) is private only in the sum."""
    name = cfg.privacy.mechanism
    if name not in MECHANISMS or not MECHANISMS.get(name).noise_in_sum or secure(cfg):
        return []
    hiding = " / ".join(n for n in PROTOCOLS.names() if PROTOCOLS.get(n).hides_updates)
    return [
        f"`privacy.mechanism` = {name} needs `secagg.protocol` = {hiding}: without it the server sees each "
        "client's update with only that client's small noise share."
    ]


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


def _dp(name: str) -> bool:
    """``name`` is a registered DP mechanism (an unknown name is reported by :func:`_mechanism_rules`)."""
    return name in MECHANISMS and MECHANISMS.get(name).dp


def _tuning() -> str:
    """The mechanisms whose clip norm the server may set (clip at the server, adaptive clipping)."""
    return " / ".join(n for n in MECHANISMS if MECHANISMS.get(n).tunes_clip)


def _one_guarantee(plan: Plan) -> list[str]:
    """A run has one DP unit; a budget needs every round to be noised."""
    by_round = [(rnd, cfg.privacy.mechanism) for rnd, cfg in plan.rounds()]
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


RULES = [_mechanism_rules, _noise_in_a_secure_sum, _central_only_settings]
PLAN_RULES = [_one_guarantee]
