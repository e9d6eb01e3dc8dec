"""``summary.json``'s privacy and secure-aggregation sections: each guarantee, its unit, what it covers and
the trust it rests on, as one statement the README repeats; and the log's one-line privacy sentence."""

from __future__ import annotations

import math
from typing import Any

from fedtune.config.plan import Plan
from fedtune.privacy import rounds as privacy
from fedtune.privacy.accounting import Event
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.privacy.secagg.protocols import secure
from fedtune.privacy.skellam import SkellamEvent
from fedtune.server.record import json_number
from fedtune.server.state import ServerState

DISTRIBUTED_COLLUSION = (
    "Each share is sized so that m = max(secagg threshold, `server.min-replies`) shares carry the target noise "
    "(a round with fewer survivors is abandoned). A client colluding with the server reveals its own share. "
    "`epsilon_under_collusion` charges every round only its target noise: it holds as long as, in every round, "
    "the clients that dropped after sending their key shares plus the survivors colluding with the server number "
    "at most n - m (n: the clients that sent their key shares). `epsilon` assumes no survivor colludes."
)
SAMPLE_SECRET = (
    "Amplification by client sampling (q = {q}) assumes nobody but the server knows who was sampled: the server "
    "draws the sample from OS entropy (never from `seed`; the sampler is never checkpointed) and no output names "
    "the sampled or replying nodes (`output.log-participants` = false)"
)
SAMPLE_LOGGED = (
    "`output.log-participants` = true writes the sampled and replying node ids to metrics.jsonl, summary.json, "
    "the checkpoints and the log: amplification by client sampling (q = {q}) then assumes those outputs stay "
    "secret from the adversary"
)
NOT_COVERED = (
    "Not covered: dataset sizes (public, as in Opacus), the number of sites sampled, replying and failing "
    "each round (`sampled`, `replied`, `failed`), the wall-clock seconds the server measures"
)
FEDERATED_EVAL = (
    ", and the per-site held-out loss and task metrics (`eval.metrics`) that federated evaluation "
    "(`eval.federated` = true) reports without noise."
)
NO_FEDERATED_EVAL = "; federated evaluation is off (`eval.federated`), so no per-site metrics are reported."
PERSONAL_SAMPLE_LEVEL = (
    " A site's personal adapter (`lora.share` = a: global A and the site's own B) never leaves the site; its own B "
    "is trained on the site's data by DP-SGD, so the adapter is covered by the sample-level guarantee only."
)
PERSONAL_NOT_COVERED = (
    " A site's personal adapter (`lora.share` = a: the site's own B; `personalize.local-steps`: local adaptation) "
    "is trained on the site's data and never leaves the site; this guarantee covers only what is sent, so it does "
    "not cover the personal adapter: only a sample-level `privacy.mechanism` = dp-sgd covers one."
)


def trust(plan: Plan, family: str) -> str:
    """The trust statement: the mechanism's, plus what amplification by client sampling assumes."""
    text = MECHANISMS.get(family).trust
    if privacy.secret_sample(plan):
        q = plan.base.server.fraction_train
        text += ". " + (SAMPLE_LOGGED if plan.base.output.log_participants else SAMPLE_SECRET).format(q=q)
    return text


def covers(plan: Plan, family: str) -> str:
    """What the guarantee covers and what it does not (per-site metrics when federated evaluation runs)."""
    rounds = [plan.base, *plan.configs()]
    evaluated = any(privacy.federated_eval(plan, cfg) for cfg in rounds)
    unit = (
        "each training example of each site. "
        if MECHANISMS.get(family).site_ledger
        else "each site's training data as a whole. "
    )
    return unit + NOT_COVERED + (FEDERATED_EVAL if evaluated else NO_FEDERATED_EVAL) + _personal(plan, family)


def _personal(plan: Plan, family: str) -> str:
    """What the guarantee says about the sites' personal adapters, when the plan makes any."""
    adapts = plan.for_round(plan.base.num_server_rounds).personalize.local_steps > 0  # after the last round
    if plan.base.lora.share != "a" and not adapts:  # lora.* is fixed for the whole run
        return ""
    return PERSONAL_SAMPLE_LEVEL if MECHANISMS.get(family).site_ledger else PERSONAL_NOT_COVERED


def _event_json(e: Event) -> dict[str, Any]:
    if isinstance(e, SkellamEvent):
        return {"skellam_mu": e.mu, "l1_sensitivity": e.l1, "l2_sensitivity": e.l2, "rounds": e.steps}
    return {"noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "rounds": e.steps}


def privacy_summary(plan: Plan, state: ServerState) -> dict[str, Any]:
    """``summary.json``'s privacy section: each guarantee with its unit, or why there is none."""
    family = privacy.unit(plan)
    if family is None:
        return {"mechanism": "none", "guarantee": "none: updates were sent and released without noise"}
    p = plan.base.privacy
    eps = state.privacy.epsilon(plan.base, family)
    out: dict[str, Any] = {
        "mechanism": family,
        "unit": MECHANISMS.get(family).unit,
        "epsilon": json_number(eps),
        "delta": p.delta,
        "accountant": p.accountant,
        "target_epsilon": p.target_epsilon or None,
        "guarantee_holds": eps is not None and math.isfinite(eps),
        "trust": trust(plan, family),
        "covers": covers(plan, family),
        "stopped": state.privacy.stopped,
    }
    if state.privacy.ledger.unprotected:
        out["why_not"] = (
            f"rounds {state.privacy.ledger.unprotected} released un-noised updates (`privacy.mechanism` = none)"
        )
    elif eps is not None and math.isinf(eps):
        out["why_not"] = "a round used `privacy.noise-multiplier` = 0"
    if MECHANISMS.get(family).site_ledger:
        out["sites"] = {str(k): json_number(v) for k, v in sorted(state.privacy.site_epsilon.items())}
        out["sites_exhausted"] = sorted(state.privacy.exhausted)
    else:
        out["events"] = [_event_json(e) for e in state.privacy.ledger.events]
        poisson = plan.base.server.sampling == "poisson"
        out["client_sampling"] = (
            "fixed-size: no amplification claimed (q = 1)"
            if not poisson
            else "poisson, but no amplification claimed (q = 1)"
            if MECHANISMS.get(family).noise_in_sum
            else f"poisson, q = {plan.base.server.fraction_train}"
        )
    if MECHANISMS.get(family).noise_in_sum:
        floor = state.privacy.floor.epsilon(p.delta, p.accountant)
        out["epsilon_under_collusion"] = json_number(floor)
        out["collusion"] = DISTRIBUTED_COLLUSION
    return out


def secagg_summary(plan: Plan) -> dict[str, Any] | None:
    """``summary.json``'s secure-aggregation section: which rounds, and what the server still learns."""
    rounds = [r for r, cfg in plan.rounds() if secure(cfg)]
    if not rounds:
        return None
    return {
        "protocol": "secagg (SecAgg+, Bell et al. 2020)",
        "rounds": rounds,
        "trust": "honest-but-curious server: it learns the sum of the surviving clients' quantized updates "
        "and nothing about any one update, as long as fewer than the threshold of a client's share holders "
        "collude with it (with mixed LoRA ranks, each rank band is a sum over at least the threshold of them, "
        "else the round is abandoned)",
        "server_still_learns": "who was sampled and who replied at each stage, each client's number of "
        "examples and LoRA rank, and the sum"
        + (
            " (in `privacy.mechanism` = distributed rounds, a sum that already carries the clients' noise shares)"
            if any(MECHANISMS.get(plan.for_round(r).privacy.mechanism).noise_in_sum for r in rounds)
            else ""
        ),
    }


def privacy_line(section: dict[str, Any]) -> str:
    """One plain sentence for the log."""
    if not MECHANISMS.get(section["mechanism"]).dp:
        return "Privacy: no formal guarantee (privacy.mechanism = none)."
    if not section["guarantee_holds"]:
        return f"Privacy: NO finite guarantee ({section.get('why_not', 'epsilon is infinite')})."
    return (
        f"Privacy ({section['mechanism']}): epsilon = {section['epsilon']:.3f} at delta = {section['delta']:g} "
        f"({section['accountant']}), {section['unit']}."
    )
