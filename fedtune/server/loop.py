"""The round loop: sample, send the global adapter, validate and aggregate deltas, evaluate.

It is a plain function of (plan, grid, state) so tests can drive it with a fake grid; the
ServerApp in ``app.py`` only supplies Flower's real grid, the evaluator and the reporter.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.arrays import Arrays
from fedtune.core.errors import CommunicationBudgetExceeded, PrivacyBudgetExceeded, UpdateRejected
from fedtune.model.lora import rank_of
from fedtune.privacy import rounds as privacy
from fedtune.privacy.central import noise_rng
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.server import buffered, site_metrics, traffic, validation
from fedtune.server.bookkeeping import account_round, declined, record_site_epsilon, server_step
from fedtune.server.exchange import release, stream_replies, wait_for_nodes
from fedtune.server.participants import redact, scrub, who
from fedtune.server.record import Failure, RoundRecord
from fedtune.server.secagg_round import secagg_round
from fedtune.server.state import Evaluate, GridLike, OnRound, ServerState
from fedtune.server.timing import RoundClock
from fedtune.strategies import Aggregator
from fedtune.wire import keys
from fedtune.wire.records import message_bytes, record_from_arrays

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


def round_content(arrays: Arrays, cfg: RunConfig, rnd: int, extra: Mapping[str, int | str] | None = None) -> RecordDict:
    """The global adapter plus the round's flat spec (and ``extra`` entries), as clients receive them."""
    spec = ConfigRecord({**cfg.to_flat(), keys.ROUND: rnd, **(extra or {})})
    return RecordDict({keys.ADAPTER: record_from_arrays(arrays), keys.SPEC: spec})


def _send(
    grid: GridLike,
    state: ServerState,
    cfg: RunConfig,
    nodes: list[int],
    kind: str,
    rnd: int,
    record: RoundRecord,
    clock: RoundClock | None = None,
    extra: Mapping[str, int | str] | None = None,
) -> Iterator[tuple[int, Message]]:
    """Send each node the global adapter at its own rank (once known; full rank when compressed) with
    the round's spec, count each node's bytes in ``record``; return the replies as a stream."""
    started = time.perf_counter()
    if nodes:  # the server steps and evaluates from exactly what the sites receive
        state.global_arrays = traffic.received_adapter(cfg, state, rnd)
    full = rank_of(state.global_arrays)
    spec = ConfigRecord({**cfg.to_flat(), keys.ROUND: rnd, keys.RUN_ID: state.run_id, **(extra or {})})
    by_rank: dict[int | None, RecordDict] = {}
    messages = []
    for node in nodes:
        rank = state.node_ranks.get(node, full)
        if rank not in by_rank:
            by_rank[rank] = RecordDict({**traffic.adapter_records(cfg, state, rnd, rank), keys.SPEC: spec})
        content = by_rank[rank]
        record.count_bytes(node, down=message_bytes(content, keys.ADAPTER))
        messages.append(Message(content, dst_node_id=node, message_type=kind, group_id=str(rnd)))
    if clock is not None:
        clock.push(time.perf_counter() - started)
    return stream_replies(grid, messages, cfg.server.round_timeout)


def _train_round(
    cfg: RunConfig,
    grid: GridLike,
    state: ServerState,
    rnd: int,
    nodes: list[int],
    record: RoundRecord,
    extra: Mapping[str, int | str],
    denominator: float,
) -> None:
    """Send train messages, validate and aggregate the replies into ``state``; fill ``record``.

    ``denominator`` is what ``central`` DP divides the noised sum by (the expected number of
    clients), fixed before any reply arrives.
    """
    sequential = bool(getattr(grid, "in_process", False))
    clock = RoundClock(sequential=sequential, site_seconds=MECHANISMS.get(cfg.privacy.mechanism).clear_site_metrics)
    record.time = clock.parts
    replies = _send(grid, state, cfg, nodes, MessageType.TRAIN, rnd, record, clock, extra)
    aggregator = _aggregator(cfg, state, denominator)
    failures: list[Failure] = []
    accepted: list[tuple[int, float, float]] = []  # (node, weight, train loss): never the delta
    exhausted: list[int] = []
    checks: dict[int, dict[str, int]] = {}
    asked, answered = set(nodes), set[int]()
    hide = frozenset(nodes) if state.hidden else None
    broken = False  # adding a checked reply raised: the aggregate may hold part of it, so it is not applied

    def fail(node: int, reason: str) -> None:
        log.warning("round %d: rejected reply from %s: %s", rnd, who(node, hide), scrub(reason, hide))
        failures.append(Failure(node, reason))

    for node, reply in replies:  # streamed: each reply is folded in, then dropped
        if node not in asked or node in answered:  # not asked, or a second answer: only the first counts
            release(reply)
            continue
        answered.add(node)
        folding = time.perf_counter()
        ok: validation.Accepted | None = None
        try:
            ok = _checked(cfg, state, node, reply, record, clock)
            if ok is not None:
                aggregator.add(ok.delta, ok.weight, rank=ok.rank, under_clip=bool(ok.metrics.get(keys.UNDER_CLIP, 0)))
        except UpdateRejected as exc:
            fail(node, validation.refused(exc))
            continue
        except Exception as exc:  # a reply is untrusted input: whatever its checks raise fails its node only
            if ok is None:
                fail(node, validation.refused(exc))
                continue
            # it passed every check, so the server's own aggregate failed: loudly, and the round is not applied
            log.exception("round %d: adding %s's checked reply failed; the round is not applied", rnd, who(node, hide))
            fail(node, validation.refused(exc, "the server failed to aggregate it"))
            broken = True
            continue
        finally:
            release(reply)
            clock.add("aggregate", time.perf_counter() - folding)
            clock.resume()
        if ok is None:
            exhausted.append(node)
            continue
        record_site_epsilon(ok.epsilon, node, state)
        if (counts := site_metrics.data_checks(ok.metrics)) is not None:
            checks[node] = counts
        state.node_ranks[node] = ok.rank
        accepted.append((node, ok.weight, ok.train_loss))
    for node in sorted(asked - answered):
        reason = f"no reply within `server.round-timeout` = {cfg.server.round_timeout:.0f} s"
        log.warning("round %d: %s failed: %s", rnd, who(node, hide), reason)
        failures.append(Failure(node, reason))
    record.replied, record.failed, record.failures = len(accepted), len(failures), failures
    record.replied_nodes = sorted(node for node, _, _ in accepted)
    if exhausted:
        record.budget_exhausted_nodes = sorted(exhausted)
    if checks:
        record.data_checks = checks
    losses = [(loss, w) for _, w, loss in accepted if not math.isnan(loss)]
    record.train_loss = site_metrics.weighted_mean(losses) if losses else None
    account_round(cfg, state, rnd, released=bool(accepted) and not broken)
    if broken or len(accepted) < cfg.server.min_replies:
        if not broken:
            log.warning(
                "round %d: %d valid repl%s < `server.min-replies` = %d; global adapter unchanged.",
                *(rnd, len(accepted), "y" if len(accepted) == 1 else "ies", cfg.server.min_replies),
            )
        record.updated = False
        return
    stepping = time.perf_counter()
    delta = aggregator.result()  # only the keys clients train (B alone under FFA-LoRA)
    record.aggregated(aggregator.metrics())
    state.global_arrays = {**state.global_arrays, **server_step(cfg, state, delta)}
    record.updated = True
    clock.add("aggregate", time.perf_counter() - stepping)


def _checked(
    cfg: RunConfig, state: ServerState, node: int, reply: Message, record: RoundRecord, clock: RoundClock
) -> validation.Accepted | None:
    """One train reply, counted (bytes, the site's seconds) and checked: None when the site declines the
    round, else the Accepted reply; raises whatever the reply makes the checks raise."""
    if not reply.has_error():
        clock.arrived(reply.content.metric_records.get(keys.METRICS, {}))
        record.count_bytes(node, up=message_bytes(reply.content, keys.DELTA))
    if declined(reply, node, state):
        return None
    return validation.accept_reply(reply, cfg, state.global_arrays)


def _aggregator(cfg: RunConfig, state: ServerState, denominator: float) -> Aggregator:
    """The round's aggregator, as the mechanism wraps the strategy's (``central``: the noised sum over
    ``denominator``)."""
    reference = validation.expected_keys(state.global_arrays, cfg)
    mechanism = MECHANISMS.get(cfg.privacy.mechanism)
    return mechanism.aggregator(
        cfg, state.global_arrays, denominator, state.noise_rng, reference=reference, state=state.privacy
    )


def _federated_eval(
    cfg: RunConfig, grid: GridLike, state: ServerState, rnd: int, record: RoundRecord
) -> dict[str, float]:
    """Every connected site's ``eval.metrics`` on its held-out split; each site's own values go
    into ``record.sites_eval``, and the federation's (example-weighted) values are returned."""
    nodes = sorted(grid.get_node_ids())
    if cfg.eval.federated is not True or not nodes:
        return {}
    replies = _send(grid, state, cfg, nodes, MessageType.EVALUATE, rnd, record)
    entries: dict[int, dict[str, Any]] = {}
    failed: list[Failure] = []
    asked, answered = set(nodes), set[int]()
    for node, reply in replies:
        if node not in asked or node in answered:  # not asked, or a second answer: only the first counts
            continue
        answered.add(node)
        try:
            if reply.has_error():
                raise UpdateRejected(f"client error: {reply.error.reason}")
            validation.check_records(reply.content, {keys.METRICS: MetricRecord})
            entries[node] = site_metrics.eval_entry(reply.content.metric_records.get(keys.METRICS, {}))
        except Exception as exc:  # a reply is untrusted input: whatever its checks raise fails its node only
            reason = validation.refused(exc)
            log.warning("round %d: eval failed on node %d: %s", rnd, node, reason)
            failed.append(Failure(node, reason))
    if failed:
        record.eval_failures = failed
    if entries:
        record.sites_eval = entries
    return site_metrics.combine(entries)


def evaluate_round(
    cfg: RunConfig, grid: GridLike, state: ServerState, rnd: int, record: RoundRecord, evaluate: Evaluate
) -> None:
    """Centralized and federated ``eval.metrics`` of the current global adapter, into ``record``."""
    central: Mapping[str, float]
    started = time.perf_counter()
    if cfg.compression.downlink != "none":  # evaluate exactly what the sites will receive
        state.global_arrays = traffic.received_adapter(cfg, state, rnd)
    if getattr(grid, "in_process", False):  # sites share this process's model: one at a time
        central = evaluate(state.global_arrays, cfg) if cfg.eval.centralized else {}
        federated = _federated_eval(cfg, grid, state, rnd, record)
    else:  # the server's own eval overlaps with the sites' eval instead of running before it
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(evaluate, state.global_arrays, cfg) if cfg.eval.centralized else None
            federated = _federated_eval(cfg, grid, state, rnd, record)
            central = pending.result() if pending is not None else {}
    record.scores = site_metrics.scores(cfg.eval.metric_names(), central, federated)
    record.time["eval"] = time.perf_counter() - started


def run(plan: Plan, grid: GridLike, state: ServerState, *, evaluate: Evaluate, on_round: OnRound) -> ServerState:
    """Run rounds ``state.round + 1 .. num-server-rounds``, each with its plan's config.

    Round 0 (before any training) is evaluation only, with the base config. Before each round the
    privacy budget is checked: a round whose release would pass ``privacy.target-epsilon`` is never
    started; the run stops there and says why (``state.privacy.stopped``).
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
        evaluate_round(base, grid, state, 0, record, evaluate)
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
        if cfg.secagg.protocol == "secagg":
            secagg_round(cfg, grid, state, rnd, sampled, record, extra, max(denominator, 1e-12))
        else:
            _train_round(cfg, grid, state, rnd, sampled, record, extra, max(denominator, 1e-12))
        evaluate_round(cfg, grid, state, rnd, record, evaluate)
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
    privacy.check_distributed(plan, solved, state.global_arrays)  # before round 1, once z is known
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
