"""The round loop: sample, send the global adapter, validate and aggregate deltas, evaluate.

It is a plain function of (plan, grid, state) so tests can drive it with a fake grid; the
ServerApp in ``app.py`` only supplies Flower's real grid, the evaluator and the reporter.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune import keys
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError, UpdateRejected
from fedtune.lora import rank_of, rank_slice
from fedtune.server import validation
from fedtune.strategies import STRATEGIES, make_aggregator, make_optimizer
from fedtune.strategies.aggregators import WeightedMean
from fedtune.strategies.plan import Plan
from fedtune.wire import Arrays, payload_bytes, record_from_arrays

log = logging.getLogger(__name__)

PULL_INTERVAL = 0.5  # seconds between polls for replies (Flower's HttpGrid waits 3 s)


class GridLike(Protocol):
    """The part of Flower's ``Grid`` the loop uses."""

    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]: ...


@dataclass
class ServerState:
    """Everything the next round depends on; a checkpoint stores exactly this."""

    round: int
    """Last completed round (0 = only the initial adapter exists)."""
    global_arrays: Arrays
    rng: np.random.Generator
    """Client sampling RNG (seeded by ``seed``, checkpointed)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    optimizer_states: dict[str, Arrays] = field(default_factory=dict)
    """Server-optimizer state (momentum, Adam moments) by optimizer name, kept across rounds."""
    node_ranks: dict[int, int] = field(default_factory=dict)
    """LoRA rank each node trained at (learned from its replies); it gets that slice next time."""


Evaluate = Callable[[Arrays], float | None]
OnRound = Callable[[ServerState, dict[str, Any]], None]


def wait_for_nodes(grid: GridLike, count: int, timeout: float) -> list[int]:
    """Connected node ids once at least ``count`` are there; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() >= deadline:
            raise FedtuneError(
                f"only {len(nodes)} of `server.min-clients` = {count} clients connected "
                f"within `server.wait-for-clients` = {timeout:.0f} s."
            )
        time.sleep(1.0)


def sample_nodes(nodes: list[int], cfg: RunConfig, rng: np.random.Generator) -> list[int]:
    """Seeded choice of ``server.num-train`` nodes, or ``ceil(fraction-train * connected)``, and at
    least ``server.min-clients``."""
    if cfg.server.num_train:
        want = max(cfg.server.min_clients, cfg.server.num_train)
    else:
        want = max(cfg.server.min_clients, math.ceil(cfg.server.fraction_train * len(nodes)))
    want = min(want, len(nodes))
    picked = rng.choice(len(nodes), size=want, replace=False)  # node ids are uint64: pick indices
    return sorted(nodes[int(i)] for i in picked)


def round_content(arrays: Arrays, cfg: RunConfig, rnd: int) -> RecordDict:
    """The global adapter plus the round's flat spec, as clients receive them."""
    spec = ConfigRecord({**cfg.to_flat(), keys.ROUND: rnd})
    return RecordDict({keys.ADAPTER: record_from_arrays(arrays), keys.SPEC: spec})


def _send(
    grid: GridLike, state: ServerState, cfg: RunConfig, nodes: list[int], kind: str, rnd: int
) -> tuple[Iterator[tuple[int, Message]], int]:
    """Send each node the global adapter at its own rank (once known) with the round's spec;
    return the replies as a stream, and the bytes sent."""
    full = rank_of(state.global_arrays)
    by_rank: dict[int | None, RecordDict] = {}
    messages, down = [], 0
    for node in nodes:
        rank = state.node_ranks.get(node, full)
        if rank not in by_rank:
            arrays = rank_slice(state.global_arrays, rank) if rank and rank != full else state.global_arrays
            by_rank[rank] = round_content(arrays, cfg, rnd)
        content = by_rank[rank]
        down += payload_bytes(content.array_records[keys.ADAPTER])
        messages.append(Message(content, dst_node_id=node, message_type=kind, group_id=str(rnd)))
    return stream_replies(grid, messages, cfg.server.round_timeout), down


def stream_replies(grid: GridLike, messages: list[Message], timeout: float) -> Iterator[tuple[int, Message]]:
    """Push ``messages`` and yield (node id, reply) as replies arrive, so the caller can fold each
    one into its aggregate and drop it: server memory then does not grow with the number of clients.

    The node is the one the original message went to: Flower answers for an unreachable node with
    an error reply from the SuperLink itself, whose source is not that node.
    """
    push, pull = getattr(grid, "push_messages", None), getattr(grid, "pull_messages", None)
    if push is None or pull is None:  # a grid that only offers the batch call
        for reply in grid.send_and_receive(messages, timeout=timeout):
            yield int(reply.metadata.src_node_id), reply
        return
    destinations = [m.metadata.dst_node_id for m in messages]
    ids = list(push(messages))
    node_of = dict(zip(ids, destinations, strict=True))
    pending = set(ids)
    del messages
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        arrived = list(pull(pending))
        for reply in arrived:
            origin = reply.metadata.reply_to_message_id
            pending.discard(origin)
            yield int(node_of.get(origin, reply.metadata.src_node_id)), reply
        if pending and not arrived:
            time.sleep(PULL_INTERVAL)


def _train_round(
    cfg: RunConfig, grid: GridLike, state: ServerState, rnd: int, nodes: list[int], row: dict[str, Any]
) -> None:
    """Send train messages, validate and aggregate the replies into ``state``; fill ``row``."""
    replies, down = _send(grid, state, cfg, nodes, MessageType.TRAIN, rnd)
    aggregator = make_aggregator(cfg.strategy, state.global_arrays)
    failures: list[dict[str, Any]] = []
    accepted: list[tuple[int, float, float]] = []  # (node, weight, train loss): never the delta
    up = 0
    answered = set()
    for node, reply in replies:  # streamed: each reply is folded in, then dropped
        answered.add(node)
        if not reply.has_error() and keys.DELTA in reply.content.array_records:
            up += payload_bytes(reply.content.array_records[keys.DELTA])
        try:
            ok = validation.accept_reply(reply, cfg, state.global_arrays)
            if ok.masks is not None:
                if not isinstance(aggregator, WeightedMean):
                    raise UpdateRejected(f"`strategy.name` = {cfg.strategy.name} has no rule for rank {ok.rank}")
                aggregator.add_masked(ok.delta, ok.weight, ok.masks)
            else:
                aggregator.add(ok.delta, ok.weight)
        except UpdateRejected as exc:
            log.warning("round %d: rejected reply from node %d: %s", rnd, node, exc)
            failures.append({"node": node, "reason": str(exc)})
            continue
        finally:
            release(reply)
        state.node_ranks[node] = ok.rank
        accepted.append((node, ok.weight, ok.train_loss))
    for node in sorted(set(nodes) - answered):
        reason = f"no reply within `server.round-timeout` = {cfg.server.round_timeout:.0f} s"
        log.warning("round %d: node %d failed: %s", rnd, node, reason)
        failures.append({"node": node, "reason": reason})
    row.update(replied=len(accepted), failed=len(failures), failures=failures, bytes_up=up, bytes_down=down)
    row["replied_nodes"] = sorted(node for node, _, _ in accepted)
    weight = sum(w for _, w, _ in accepted)
    row["train_loss"] = sum(loss * w for _, w, loss in accepted) / weight if accepted else None
    if len(accepted) < cfg.server.min_replies:
        log.warning(
            "round %d: %d valid repl%s < `server.min-replies` = %d; global adapter unchanged.",
            *(rnd, len(accepted), "y" if len(accepted) == 1 else "ies", cfg.server.min_replies),
        )
        row["updated"] = False
        return
    delta = aggregator.result()  # only the keys clients train (B alone under FFA-LoRA)
    state.global_arrays = {**state.global_arrays, **server_step(cfg, state, delta)}
    row.update(aggregator.metrics())
    row["updated"] = True


def release(reply: Message) -> None:
    """Drop a reply's arrays now: Flower's message objects sit in reference cycles, so without
    this their payload waits for the cyclic garbage collector (about 15 replies here)."""
    if reply.has_error() or not reply.has_content():
        return
    for record in reply.content.array_records.values():
        for key in list(record.keys()):
            del record[key]


def server_step(cfg: RunConfig, state: ServerState, delta: Arrays) -> Arrays:
    """Apply the round's server optimizer, restoring and saving its state in ``state``."""
    name = STRATEGIES.get(cfg.strategy.name).optimizer
    optimizer = make_optimizer(cfg.strategy)  # built from this round's hyper-parameters
    optimizer.load_state_dict(state.optimizer_states.get(name, {}))
    new = optimizer.step({k: state.global_arrays[k] for k in delta}, delta)
    if saved := optimizer.state_dict():
        state.optimizer_states[name] = saved
    return new


def _federated_eval(cfg: RunConfig, grid: GridLike, state: ServerState, rnd: int, row: dict[str, Any]) -> float | None:
    nodes = sorted(grid.get_node_ids())
    if not cfg.eval.federated or not nodes:
        return None
    replies, down = _send(grid, state, cfg, nodes, MessageType.EVALUATE, rnd)
    row["bytes_down"] = row.get("bytes_down", 0) + down
    total, weight = 0.0, 0.0
    for node, reply in replies:
        if reply.has_error():
            log.warning("round %d: eval failed on node %d: %s", rnd, node, reply.error.reason)
            continue
        metrics: Mapping[str, Any] = reply.content.metric_records.get(keys.METRICS, {})
        loss, n = metrics.get(keys.EVAL_LOSS), metrics.get(keys.NUM_EXAMPLES)
        if isinstance(loss, float) and math.isfinite(loss) and isinstance(n, int) and n > 0:
            total, weight = total + loss * n, weight + n
    return total / weight if weight else None


def evaluate_round(
    cfg: RunConfig, grid: GridLike, state: ServerState, rnd: int, row: dict[str, Any], evaluate: Evaluate
) -> None:
    """Centralized and federated held-out loss of the current global adapter, into ``row``."""
    if getattr(grid, "in_process", False):  # sites share this process's model: one at a time
        central = evaluate(state.global_arrays) if cfg.eval.centralized else None
        federated = _federated_eval(cfg, grid, state, rnd, row)
    else:  # the server's own eval overlaps with the sites' eval instead of running before it
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(evaluate, state.global_arrays) if cfg.eval.centralized else None
            federated = _federated_eval(cfg, grid, state, rnd, row)
            central = pending.result() if pending is not None else None
    row.update(eval_loss_central=central, eval_loss_federated=federated)
    row["eval_loss"] = central if central is not None else federated


def run(plan: Plan, grid: GridLike, state: ServerState, *, evaluate: Evaluate, on_round: OnRound) -> ServerState:
    """Run rounds ``state.round + 1 .. num-server-rounds``, each with its plan's config.

    Round 0 (before any training) is evaluation only, with the base config.
    """
    base = plan.base
    if state.round == 0 and not state.history:
        start = time.monotonic()
        wait_for_nodes(grid, base.server.min_clients, base.server.wait_for_clients)
        row: dict[str, Any] = {
            "round": 0,
            "sampled": 0,
            "replied": 0,
            "failed": 0,
            "train_loss": None,
            "bytes_up": 0,
            "bytes_down": 0,
        }
        evaluate_round(base, grid, state, 0, row, evaluate)
        row["seconds"] = time.monotonic() - start
        state.history.append(row)
        on_round(state, row)
    for rnd in range(state.round + 1, base.num_server_rounds + 1):
        cfg = plan.for_round(rnd)
        start = time.monotonic()
        nodes = wait_for_nodes(grid, cfg.server.min_clients, cfg.server.wait_for_clients)
        sampled = sample_nodes(nodes, cfg, state.rng)
        row = {"round": rnd, "sampled": len(sampled), "sampled_nodes": sampled, "spec": plan.spec(rnd)}
        _train_round(cfg, grid, state, rnd, sampled, row)
        evaluate_round(cfg, grid, state, rnd, row, evaluate)
        row["seconds"] = time.monotonic() - start
        state.round = rnd
        state.history.append(row)
        on_round(state, row)
    return state
