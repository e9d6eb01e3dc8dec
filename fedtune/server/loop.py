"""The round loop: sample, send the global adapter, validate and aggregate deltas, evaluate.

It is a plain function of (config, grid, state) so tests can drive it with a fake grid; the
ServerApp in ``app.py`` only supplies Flower's real grid, the evaluator and the reporter.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune import keys
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError, UpdateRejected
from fedtune.server.validation import validate_delta
from fedtune.strategies import STRATEGIES
from fedtune.wire import Arrays, arrays_from_record, payload_bytes, record_from_arrays

log = logging.getLogger(__name__)


class GridLike(Protocol):
    """The part of Flower's ``Grid`` the loop uses."""

    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]: ...


@dataclass
class ServerState:
    """Everything the next round depends on; a checkpoint stores exactly this."""

    round: int
    """Last completed round (0 = only the initial adapter exists)."""
    global_arrays: Arrays
    rng: np.random.Generator
    """Client sampling RNG (seeded by ``seed``, checkpointed)."""
    history: list[dict[str, Any]] = field(default_factory=list)


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
    """Seeded choice of ``max(min-clients, ceil(fraction-train * connected))`` nodes."""
    want = max(cfg.server.min_clients, math.ceil(cfg.server.fraction_train * len(nodes)))
    want = min(want, len(nodes))
    picked = rng.choice(len(nodes), size=want, replace=False)  # node ids are uint64: pick indices
    return sorted(nodes[int(i)] for i in picked)


def round_content(arrays: Arrays, cfg: RunConfig, rnd: int) -> RecordDict:
    """The global adapter plus the round's flat spec, as clients receive them."""
    spec = ConfigRecord({**cfg.to_flat(), keys.ROUND: rnd})
    return RecordDict({keys.ADAPTER: record_from_arrays(arrays), keys.SPEC: spec})


def _send(
    grid: GridLike, content: RecordDict, nodes: list[int], kind: str, rnd: int, timeout: float
) -> tuple[list[Message], int]:
    messages = [Message(content, dst_node_id=n, message_type=kind, group_id=str(rnd)) for n in nodes]
    down = payload_bytes(content.array_records[keys.ADAPTER]) * len(nodes)
    return list(grid.send_and_receive(messages, timeout=timeout)), down


def _train_round(
    cfg: RunConfig, grid: GridLike, state: ServerState, rnd: int, nodes: list[int], row: dict[str, Any]
) -> None:
    """Send train messages, validate and aggregate the replies into ``state``; fill ``row``."""
    replies, down = _send(
        grid,
        round_content(state.global_arrays, cfg, rnd),
        nodes,
        MessageType.TRAIN,
        rnd,
        cfg.server.round_timeout,
    )
    strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy)
    failures: list[dict[str, Any]] = []
    losses: list[tuple[float, float]] = []
    up = 0
    seen = set()
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        seen.add(node)
        try:
            if reply.has_error():
                raise UpdateRejected(f"client error: {reply.error.reason}")
            record = reply.content.array_records.get(keys.DELTA)
            if record is None:
                raise UpdateRejected(f"reply has no '{keys.DELTA}' record")
            up += payload_bytes(record)
            metrics: Mapping[str, Any] = reply.content.metric_records.get(keys.METRICS, {})
            examples = metrics.get(keys.NUM_EXAMPLES)
            if not isinstance(examples, int | float) or examples < 1:
                raise UpdateRejected(f"'{keys.NUM_EXAMPLES}' missing or < 1")
            delta = validate_delta(
                arrays_from_record(record), state.global_arrays, cfg.server.max_update_norm
            )
        except UpdateRejected as exc:
            log.warning("round %d: rejected reply from node %d: %s", rnd, node, exc)
            failures.append({"node": node, "reason": str(exc)})
            continue
        weight = float(examples) if cfg.strategy.weighting == "examples" else 1.0
        strategy.add(delta, weight)
        losses.append((float(metrics.get(keys.TRAIN_LOSS, math.nan)), weight))
    for node in sorted(set(nodes) - seen):
        reason = f"no reply within `server.round-timeout` = {cfg.server.round_timeout:.0f} s"
        log.warning("round %d: node %d failed: %s", rnd, node, reason)
        failures.append({"node": node, "reason": reason})
    replied = len(losses)
    row.update(replied=replied, failed=len(failures), failures=failures, bytes_up=up, bytes_down=down)
    row["train_loss"] = sum(v * w for v, w in losses) / sum(w for _, w in losses) if losses else None
    if replied < cfg.server.min_replies:
        log.warning(
            "round %d: %d valid repl%s < `server.min-replies` = %d; global adapter unchanged.",
            rnd,
            replied,
            "y" if replied == 1 else "ies",
            cfg.server.min_replies,
        )
        row["updated"] = False
        return
    state.global_arrays = strategy.step(state.global_arrays, strategy.combine())
    row["updated"] = True


def _federated_eval(
    cfg: RunConfig, grid: GridLike, state: ServerState, rnd: int, row: dict[str, Any]
) -> float | None:
    nodes = sorted(grid.get_node_ids())
    if not cfg.eval.federated or not nodes:
        return None
    replies, down = _send(
        grid,
        round_content(state.global_arrays, cfg, rnd),
        nodes,
        MessageType.EVALUATE,
        rnd,
        cfg.server.round_timeout,
    )
    row["bytes_down"] = row.get("bytes_down", 0) + down
    total, weight = 0.0, 0.0
    for reply in replies:
        if reply.has_error():
            log.warning(
                "round %d: eval failed on node %d: %s", rnd, reply.metadata.src_node_id, reply.error.reason
            )
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
    # The server's own eval overlaps with the sites' eval instead of running before it.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(evaluate, state.global_arrays) if cfg.eval.centralized else None
        federated = _federated_eval(cfg, grid, state, rnd, row)
        central = pending.result() if pending is not None else None
    row.update(eval_loss_central=central, eval_loss_federated=federated)
    row["eval_loss"] = central if central is not None else federated


def run(
    cfg: RunConfig, grid: GridLike, state: ServerState, *, evaluate: Evaluate, on_round: OnRound
) -> ServerState:
    """Run rounds ``state.round + 1 .. num-server-rounds``; round 0 (before training) is eval only."""
    if state.round == 0 and not state.history:
        start = time.monotonic()
        wait_for_nodes(grid, cfg.server.min_clients, cfg.server.wait_for_clients)
        row: dict[str, Any] = {
            "round": 0,
            "sampled": 0,
            "replied": 0,
            "failed": 0,
            "train_loss": None,
            "bytes_up": 0,
            "bytes_down": 0,
        }
        evaluate_round(cfg, grid, state, 0, row, evaluate)
        row["seconds"] = time.monotonic() - start
        state.history.append(row)
        on_round(state, row)
    for rnd in range(state.round + 1, cfg.num_server_rounds + 1):
        start = time.monotonic()
        nodes = wait_for_nodes(grid, cfg.server.min_clients, cfg.server.wait_for_clients)
        sampled = sample_nodes(nodes, cfg, state.rng)
        row = {"round": rnd, "sampled": len(sampled), "sampled_nodes": sampled}
        _train_round(cfg, grid, state, rnd, sampled, row)
        evaluate_round(cfg, grid, state, rnd, row, evaluate)
        row["seconds"] = time.monotonic() - start
        state.round = rnd
        state.history.append(row)
        on_round(state, row)
    return state
