"""Buffered asynchronous rounds (``server.mode = async``): FedBuff.

Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"
(https://arxiv.org/abs/2106.06639). The server keeps up to ``server.concurrency`` sites training, each
from the latest global version it was sent. Every ``server.buffer-size`` (K) accepted replies make a new
version: each delta is scaled by ``strategy.staleness``'s weight of its staleness (versions published
since its site started), the strategy's aggregator averages them, and the strategy's server optimizer
steps the global adapter. A reply staler than ``server.max-staleness`` is dropped and logged. One row
of ``metrics.jsonl`` per version; ``num-server-rounds`` counts versions. Work in flight when the run
ends (or the server stops) is lost; a resumed run starts every site from the resumed version.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.errors import PrivacyBudgetExceeded, UpdateRejected
from fedtune.privacy import rounds as privacy
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.server import frame, site_metrics, traffic, validation
from fedtune.server.bookkeeping import account_round, declined, record_site_epsilon, server_step
from fedtune.server.exchange import release, wait_for_nodes
from fedtune.server.inflight import Arrival, Inflight
from fedtune.server.record import Contribution, Failure, RoundRecord
from fedtune.server.state import GridLike, OnRound, ServerState
from fedtune.strategies import Aggregator
from fedtune.strategies.staleness import staleness_weight
from fedtune.wire import keys
from fedtune.wire.records import message_bytes

log = logging.getLogger(__name__)

EvaluateVersion = Callable[[RunConfig, int, RoundRecord], None]
"""Evaluates the current global adapter as version ``v`` into the record (the round loop's evaluation)."""
DISPATCH_STRIDE = 1_000_000
"""A site's seed "round" is version * stride + the dispatch's count: two sends from one version never
train on the same batches."""
FAILURE_LIMIT = 3
"""A version stops the run after this many failures per connected site without reaching K replies."""


@dataclass
class Buffer:
    """What one version has gathered so far."""

    aggregator: Aggregator
    accepted: list[tuple[int, float, float]] = field(default_factory=list)
    """(node, weight, train loss) of each aggregated reply."""
    contributors: list[Contribution] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)


def run(
    plan: Plan,
    grid: GridLike,
    state: ServerState,
    extra: Mapping[str, int | str],
    solved: float | None,
    *,
    evaluate: EvaluateVersion,
    on_round: OnRound,
) -> ServerState:
    """Publish versions ``state.round + 1 .. num-server-rounds``; each version's settings come from its plan entry."""
    base = plan.base
    family = privacy.unit(plan)
    flight = Inflight(grid, base.server.round_timeout)
    wait_for_nodes(grid, base.server.min_clients, base.server.wait_for_clients)
    try:
        for version in range(state.round + 1, base.num_server_rounds + 1):
            cfg = _settled(privacy.round_config(plan.for_round(version), state.privacy, solved))
            start = time.monotonic()
            try:
                privacy.check_budget(cfg, state.privacy, version, state.global_arrays)
            except PrivacyBudgetExceeded as exc:
                state.privacy.stopped = str(exc)
                log.warning("%s", exc)
                break
            record = RoundRecord(round=version, version=version, spec=plan.spec(version))
            if not _gather(cfg, grid, state, version, record, flight, extra):
                break
            evaluate(cfg, version, record)
            record.idle_seconds = flight.idle_seconds(sorted(grid.get_node_ids()))
            state.round = version
            record.seconds = time.monotonic() - start
            record.epsilon = state.privacy.epsilon(cfg, family)
            state.history.append(record)
            on_round(state, record)
    finally:
        if dropped := flight.drop():
            log.info("async: %d site(s) still training when the run ended; their work is dropped", dropped)
    return state


def _settled(cfg: RunConfig) -> RunConfig:
    """Sites are busy training: federated evaluation (refused when asked for) is off under ``auto``."""
    return cfg.override({"eval.federated": False}) if cfg.eval.federated == "auto" else cfg


def _gather(
    cfg: RunConfig,
    grid: GridLike,
    state: ServerState,
    version: int,
    record: RoundRecord,
    flight: Inflight,
    extra: Mapping[str, int | str],
) -> bool:
    """Keep sites busy until K replies are aggregated, then step the global adapter into ``version``;
    False (global unchanged, the reason logged) when no site can train any more."""
    mechanism = MECHANISMS.get(cfg.privacy.mechanism)
    reference = validation.expected_keys(state.global_arrays, cfg)
    k = cfg.server.buffer_size
    buffer = Buffer(
        mechanism.aggregator(
            cfg, state.global_arrays, float(k), state.noise_rng, reference=reference, state=state.privacy
        )
    )
    waited = 0.0
    while len(buffer.accepted) < k:
        connected = sorted(grid.get_node_ids())
        _dispatch(cfg, state, version, record, flight, buffer, connected, extra)
        if len(buffer.failures) >= FAILURE_LIMIT * max(len(connected), k):
            log.warning(
                "async version %d: %d failures and no %d replies; the run stops.", version, len(buffer.failures), k
            )
            return False
        started = time.perf_counter()
        arrival = flight.next()
        waited += time.perf_counter() - started
        if arrival is None:
            state.privacy.stopped = state.privacy.stopped or "stopped: no site is left that can train."
            log.warning("async version %d: no site is left that can train; the run stops.", version)
            return False
        _fold(cfg, state, arrival, buffer, record)
    stepping = time.perf_counter()
    delta = buffer.aggregator.result()
    record.aggregated(buffer.aggregator.metrics())
    state.global_arrays = {**state.global_arrays, **server_step(cfg, state, delta)}
    account_round(cfg, state, version, released=True)
    record.time = {"wait": waited, "aggregate": time.perf_counter() - stepping}
    _close(record, buffer)
    return True


def _dispatch(
    cfg: RunConfig,
    state: ServerState,
    version: int,
    record: RoundRecord,
    flight: Inflight,
    buffer: Buffer,
    connected: list[int],
    extra: Mapping[str, int | str],
) -> None:
    """Send the latest global adapter to free sites, up to ``server.concurrency`` busy ones."""
    limit = cfg.server.concurrency or len(connected)
    free = flight.free(connected, exclude=state.privacy.exhausted)[: max(0, limit - len(flight.busy()))]
    if not free:
        return
    state.global_arrays = traffic.received_adapter(cfg, state, version)
    downlink = traffic.Downlink(cfg, state, version)
    for node in free:
        seed_round = version * DISPATCH_STRIDE + len(buffer.sent)
        spec = ConfigRecord({**cfg.to_flat(), **extra, keys.ROUND: seed_round, keys.RUN_ID: state.run_id})
        content = RecordDict({**downlink.records(node), keys.SPEC: spec})
        record.count_bytes(node, down=message_bytes(content, keys.ADAPTER))
        flight.send(
            Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(version)), node, state.round
        )
        buffer.sent.append(node)


def _fold(cfg: RunConfig, state: ServerState, arrival: Arrival, buffer: Buffer, record: RoundRecord) -> None:
    """One reply: dropped when too stale, else checked and added to the buffer, weighted by its staleness."""
    node, reply = arrival.work.node, arrival.reply
    staleness = state.round - arrival.work.version
    if reply is None or reply.has_error():  # it may lack LoRA-SB's frame: its next adapter carries it
        frame.forget(state.frame_holders, [node])
    if reply is None:
        _fail(buffer, node, f"no reply within `server.round-timeout` = {cfg.server.round_timeout:.0f} s")
        return
    try:
        if not reply.has_error():
            record.count_bytes(node, up=message_bytes(reply.content, keys.DELTA))
        if declined(reply, node, state):
            return
        if 0 < cfg.server.max_staleness < staleness:
            _fail(buffer, node, f"staleness {staleness} > `server.max-staleness` = {cfg.server.max_staleness}; dropped")
            return
        ok = validation.accept_reply(reply, cfg, state.global_arrays)
    except Exception as exc:  # a reply is untrusted input: whatever its checks raise fails its node only
        _fail(buffer, node, validation.refused(exc))
        return
    finally:
        release(reply)
    factor = staleness_weight(staleness, cfg.strategy)
    delta = ok.delta if factor == 1.0 else {key: value * factor for key, value in ok.delta.items()}
    under_clip = bool(ok.metrics.get(keys.UNDER_CLIP, 0))
    try:
        buffer.aggregator.add(delta, ok.weight, rank=ok.rank, under_clip=under_clip)
    except UpdateRejected as exc:
        _fail(buffer, node, validation.refused(exc))
        return
    record_site_epsilon(ok.epsilon, node, state)
    state.node_ranks[node] = ok.rank
    buffer.accepted.append((node, ok.weight, ok.train_loss))
    buffer.contributors.append(Contribution(node, staleness))


def _fail(buffer: Buffer, node: int, reason: str) -> None:
    log.warning("async: reply from node %d not used: %s", node, reason)
    buffer.failures.append(Failure(node, reason))


def _close(record: RoundRecord, buffer: Buffer) -> None:
    """The version's counts, contributors and training loss into ``record``."""
    record.sampled, record.sampled_nodes = len(buffer.sent), sorted(set(buffer.sent))
    record.replied, record.failed = len(buffer.accepted), len(buffer.failures)
    record.failures = buffer.failures
    record.replied_nodes = sorted({node for node, _, _ in buffer.accepted})
    record.contributors = buffer.contributors
    losses = [(loss, w) for _, w, loss in buffer.accepted if not math.isnan(loss)]
    record.train_loss = site_metrics.weighted_mean(losses) if losses else None
    record.updated = True
