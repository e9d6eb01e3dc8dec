"""One training round in the clear (``secagg.protocol = none``): send, fold each reply into the round's
aggregator as it arrives, then apply the strategy's server step.

Every reply is untrusted input: whatever its checks raise fails its node only. A reply that passed every
check but made the server's own aggregate fail leaves the round unapplied (the aggregate may hold part of
it), and says so loudly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from flwr.app import Message, MessageType

from fedtune.config import RunConfig
from fedtune.core.errors import UpdateRejected
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.server import site_metrics, validation
from fedtune.server.bookkeeping import account_round, declined, record_site_epsilon, server_step
from fedtune.server.exchange import release
from fedtune.server.participants import scrub, who
from fedtune.server.record import Failure, RoundRecord
from fedtune.server.send import send_adapter
from fedtune.server.state import GridLike, ServerState
from fedtune.server.timing import RoundClock, waited_for_slowest
from fedtune.strategies import Aggregator
from fedtune.wire import keys
from fedtune.wire.records import message_bytes

log = logging.getLogger(__name__)

now = time.monotonic
"""When a reply arrived, for the sites' idle seconds (a test reads a virtual clock instead)."""


@dataclass
class _Outcome:
    """What the replies of one round came to (never a delta: those are folded in and dropped)."""

    accepted: list[tuple[int, float, float]] = field(default_factory=list)  # (node, weight, train loss)
    failures: list[Failure] = field(default_factory=list)
    exhausted: list[int] = field(default_factory=list)
    checks: dict[int, dict[str, int]] = field(default_factory=dict)
    broken: bool = False  # adding a checked reply raised: the aggregate may hold part of it


def train_round(
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
    replies = send_adapter(grid, state, cfg, nodes, MessageType.TRAIN, rnd, record, clock, extra)
    aggregator = _aggregator(cfg, state, denominator)
    hide = frozenset(nodes) if state.hidden else None
    outcome = _fold(cfg, state, rnd, nodes, replies, aggregator, record, clock, hide)
    _record(outcome, record)
    accepted = outcome.accepted
    account_round(cfg, state, rnd, released=bool(accepted) and not outcome.broken)
    if outcome.broken or len(accepted) < cfg.server.min_replies:
        if not outcome.broken:
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


def _fold(
    cfg: RunConfig,
    state: ServerState,
    rnd: int,
    nodes: list[int],
    replies: Iterator[tuple[int, Message]],
    aggregator: Aggregator,
    record: RoundRecord,
    clock: RoundClock,
    hide: frozenset[int] | None,
) -> _Outcome:
    """Fold each reply into ``aggregator`` as it streams in; only the first answer of an asked node counts."""
    out = _Outcome()
    asked, answered = set(nodes), set[int]()
    replied_at: dict[int, float] = {}  # when each site's reply (not an error) arrived
    last = 0.0

    def fail(node: int, reason: str) -> None:
        log.warning("round %d: rejected reply from %s: %s", rnd, who(node, hide), scrub(reason, hide))
        out.failures.append(Failure(node, reason))

    for node, reply in replies:  # streamed: each reply is folded in, then dropped
        if node not in asked or node in answered:  # not asked, or a second answer: only the first counts
            release(reply)
            continue
        answered.add(node)
        last = now()
        if not reply.has_error():
            replied_at[node] = last
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
            out.broken = True
            continue
        finally:
            release(reply)
            clock.add("aggregate", time.perf_counter() - folding)
            clock.resume()
        _keep(ok, node, state, out)
    # the round ends with its slowest reply, or when the stream gave up on a site that never answered; under
    # DP a site's seconds follow its data, and hidden samples keep their node ids out: no idle seconds then
    if clock.site_seconds and hide is None:
        record.idle_seconds = waited_for_slowest(replied_at, last if answered == asked else now())
    for node in sorted(asked - answered):
        reason = f"no reply within `server.round-timeout` = {cfg.server.round_timeout:.0f} s"
        log.warning("round %d: %s failed: %s", rnd, who(node, hide), reason)
        out.failures.append(Failure(node, reason))
    return out


def _keep(ok: validation.Accepted | None, node: int, state: ServerState, out: _Outcome) -> None:
    """Note one folded reply: a declined round (spent budget), or an accepted update's facts."""
    if ok is None:
        out.exhausted.append(node)
        return
    record_site_epsilon(ok.epsilon, node, state)
    if (counts := site_metrics.data_checks(ok.metrics)) is not None:
        out.checks[node] = counts
    state.node_ranks[node] = ok.rank
    out.accepted.append((node, ok.weight, ok.train_loss))


def _record(out: _Outcome, record: RoundRecord) -> None:
    """The round's replies, failures, data checks and weighted train loss, into ``record``."""
    record.replied, record.failed, record.failures = len(out.accepted), len(out.failures), out.failures
    record.replied_nodes = sorted(node for node, _, _ in out.accepted)
    if out.exhausted:
        record.budget_exhausted_nodes = sorted(out.exhausted)
    if out.checks:
        record.data_checks = out.checks
    losses = [(loss, w) for _, w, loss in out.accepted if not math.isnan(loss)]
    record.train_loss = site_metrics.weighted_mean(losses) if losses else None


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
