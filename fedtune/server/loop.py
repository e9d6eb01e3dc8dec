"""The round loop: sample, send the global adapter, validate and aggregate deltas, evaluate.

It is a plain function of (plan, grid, state) so tests can drive it with a fake grid; the
ServerApp in ``app.py`` only supplies Flower's real grid, the evaluator and the reporter.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from fedtune.config import RunConfig
from fedtune.config.plan import Plan, evaluated_in
from fedtune.core.errors import CommunicationBudgetExceeded, PrivacyBudgetExceeded
from fedtune.privacy import compat
from fedtune.privacy import rounds as privacy
from fedtune.privacy.central import noise_rng
from fedtune.server import buffered, traffic
from fedtune.server.eval_round import evaluate_round
from fedtune.server.exchange import wait_for_nodes
from fedtune.server.participants import redact
from fedtune.server.record import RoundRecord
from fedtune.server.runners import RUNNERS
from fedtune.server.state import Evaluate, GridLike, OnFinal, OnRound, ServerState
from fedtune.wire import keys

log = logging.getLogger(__name__)


def sample_nodes(nodes: list[int], cfg: RunConfig, rng: np.random.Generator) -> list[int]:
    """Choice by ``rng`` (see :attr:`ServerState.rng`) of ``server.num-train`` nodes, or
    ``ceil(fraction-train * connected)``, and at least ``server.min-clients``; under
    ``server.sampling = poisson`` each node independently with probability ``fraction-train``."""
    if cfg.server.sampling == "poisson":
        return sorted(
            n for n, draw in zip(nodes, rng.random(len(nodes)), strict=True) if draw < cfg.server.fraction_train
        )
    if cfg.server.num_train:
        want = max(cfg.server.min_clients, cfg.server.num_train)
    else:
        want = max(cfg.server.min_clients, math.ceil(cfg.server.fraction_train * len(nodes)))
    want = min(want, len(nodes))
    picked = rng.choice(len(nodes), size=want, replace=False)  # node ids are uint64: pick indices
    return sorted(nodes[int(i)] for i in picked)


def run(
    plan: Plan,
    grid: GridLike,
    state: ServerState,
    *,
    evaluate: Evaluate,
    on_round: OnRound,
    on_final: OnFinal | None = None,
) -> ServerState:
    """Run rounds ``state.round + 1 .. num-server-rounds``, each with its plan's config.

    Round 0 (before any training) is evaluation only, with the base config. Before each round the
    privacy budget is checked: a round whose release would pass ``privacy.target-epsilon`` is never
    started; the run stops there and says why (``state.privacy.stopped``). ``on_final`` hears of the
    last planned round's global adapter as soon as its centralized evaluation is done (the server's
    model is free while the sites evaluate; see ``server/final_sample.py``).
    """
    base = _settled(plan, plan.base)
    family = privacy.unit(plan)
    state.hidden = privacy.participants_hidden(plan)
    if privacy.secret_sample(plan):  # amplification assumes the sample secret: never from `seed`, new on resume
        state.rng = noise_rng()
    solved = _planned_noise(plan, base, state)
    extra = {keys.DP_PLANNED_STEPS: privacy.dpsgd_planned_steps(plan)}
    if state.round == 0 and not state.history:
        start = time.monotonic()
        connected = wait_for_nodes(grid, base.server.min_clients, base.server.wait_for_clients)
        if not _affordable(base, state, 0, [], connected):
            return state
        record = RoundRecord(round=0)
        evaluate_round(evaluated_in(base, 0), grid, state, 0, record, evaluate)  # eval.federated-every
        _finish(state, record, start, state.privacy.epsilon(base, family), on_round)
    if base.server.mode == "async":  # FedBuff: versions instead of rounds (server/buffered.py)
        evaluate_version = lambda c, v, r: evaluate_round(c, grid, state, v, r, evaluate)  # noqa: E731
        return buffered.run(plan, grid, state, extra, solved, evaluate=evaluate_version, on_round=on_round)
    for rnd in range(state.round + 1, base.num_server_rounds + 1):
        if state.privacy.stopped:
            break
        cfg = _settled(plan, privacy.round_config(plan.for_round(rnd), state.privacy, solved))
        start = time.monotonic()
        picked = _sample(cfg, grid, state, rnd)
        if picked is None:
            break
        sampled, denominator = picked
        record = RoundRecord(round=rnd, sampled=len(sampled), sampled_nodes=sampled, spec=plan.spec(rnd))
        RUNNERS.get(cfg.secagg.protocol)(cfg, grid, state, rnd, sampled, record, extra, max(denominator, 1e-12))
        last = on_final if rnd == base.num_server_rounds else None
        evaluate_round(cfg, grid, state, rnd, record, evaluate, then=last)
        if state.hidden:
            redact(record, sampled)
        state.round = rnd
        _finish(state, record, start, state.privacy.epsilon(cfg, family), on_round)
    return state


def _planned_noise(plan: Plan, base: RunConfig, state: ServerState) -> float | None:
    """The noise multiplier solved from ``privacy.target-epsilon`` (None when it is not solved), with what
    the planned rounds will spend logged; refuses a distributed-DP plan that cannot carry it."""
    solved = privacy.solved_noise(plan, state.global_arrays)
    if solved is not None:
        log.info(
            "privacy: noise multiplier %.4f keeps the planned rounds within epsilon %g",
            solved,
            base.privacy.target_epsilon,
        )
    projected = privacy.projected_epsilon(plan, solved, state.global_arrays)
    if projected is not None:
        log.info(
            "privacy: the planned %d rounds reach user-level epsilon %.3f at delta %g (%s)%s",
            *(base.num_server_rounds, projected, base.privacy.delta, base.privacy.accountant),
            "; the budget will stop the run earlier" if 0 < base.privacy.target_epsilon < projected else "",
        )
    compat.check(plan, compat.Facts(arrays=state.global_arrays, solved=solved))  # before round 1, once z is known
    return solved


def _sample(cfg: RunConfig, grid: GridLike, state: ServerState, rnd: int) -> tuple[list[int], float] | None:
    """Round ``rnd``'s sample and the denominator central DP divides by; None when a budget (privacy or
    communication) stops the run before the round, with the reason in ``state``."""
    try:
        privacy.check_budget(cfg, state.privacy, rnd, state.global_arrays)
        connected = wait_for_nodes(grid, cfg.server.min_clients, cfg.server.wait_for_clients)
        nodes = _eligible(connected, cfg, state)
    except PrivacyBudgetExceeded as exc:
        state.privacy.stopped = str(exc)
        log.warning("%s", exc)
        return None
    sampled = sample_nodes(nodes, cfg, state.rng)
    if not _affordable(cfg, state, rnd, sampled, connected):
        return None
    denominator = cfg.server.fraction_train * len(nodes) if cfg.server.sampling == "poisson" else len(sampled)
    return sampled, denominator


def _affordable(cfg: RunConfig, state: ServerState, rnd: int, sampled: list[int], connected: list[int]) -> bool:
    """Whether round ``rnd`` (training ``sampled``, evaluating at ``connected``) fits
    ``communication.budget-mb``; else the run stops (False), the reason in ``state``."""
    try:
        traffic.check_budget(cfg, state, rnd, traffic.projected_bytes(cfg, state, sampled, _evaluated(cfg, connected)))
    except CommunicationBudgetExceeded as exc:
        state.communication_stopped = str(exc)
        log.warning("%s", exc)
        return False
    return True


def _finish(state: ServerState, record: RoundRecord, start: float, epsilon: float | None, on_round: OnRound) -> None:
    """Close the round's record (its seconds since ``start``, epsilon so far), keep it and report it."""
    record.seconds = time.monotonic() - start
    record.epsilon = epsilon
    state.history.append(record)
    on_round(state, record)


def _evaluated(cfg: RunConfig, connected: list[int]) -> list[int]:
    """The nodes federated evaluation will send the adapter to."""
    return connected if cfg.eval.federated is True else []


def _settled(plan: Plan, cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``eval.federated = auto`` resolved for this run (off under a DP mechanism)."""
    if cfg.eval.federated != "auto":
        return cfg
    return cfg.override({"eval.federated": privacy.federated_eval(plan, cfg)})


def _eligible(nodes: list[int], cfg: RunConfig, state: ServerState) -> list[int]:
    """Connected nodes that have not spent their privacy budget; stop when too few are left."""
    left = [n for n in nodes if n not in state.privacy.exhausted]
    if len(left) < cfg.server.min_clients and state.privacy.exhausted:
        raise PrivacyBudgetExceeded(
            f"stopped: only {len(left)} site(s) have privacy budget left, fewer than `server.min-clients` = "
            f"{cfg.server.min_clients} ({len(state.privacy.exhausted)} spent their `privacy.target-epsilon`)."
        )
    return left
