"""A round's evaluation: the server's own (centralized) and every connected site's (federated), of the
current global adapter, into the round's record."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flwr.app import MessageType, MetricRecord

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import UpdateRejected
from fedtune.server import site_metrics, traffic, validation
from fedtune.server.record import Failure, RoundRecord
from fedtune.server.send import send_adapter
from fedtune.server.state import Evaluate, GridLike, OnFinal, ServerState
from fedtune.wire import keys

log = logging.getLogger(__name__)


def federated_eval(
    cfg: RunConfig, grid: GridLike, state: ServerState, rnd: int, record: RoundRecord
) -> dict[str, float]:
    """Every connected site's ``eval.metrics`` on its held-out split; each site's own values go
    into ``record.sites_eval``, and the federation's (example-weighted) values are returned."""
    nodes = sorted(grid.get_node_ids())
    if cfg.eval.federated is not True or not nodes:
        return {}
    replies = send_adapter(grid, state, cfg, nodes, MessageType.EVALUATE, rnd, record)
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


def _central(evaluate: Evaluate, arrays: Arrays, cfg: RunConfig, then: OnFinal | None) -> Mapping[str, float]:
    """The server's own evaluation (when ``eval.centralized``), then ``then(arrays)``."""
    central = evaluate(arrays, cfg) if cfg.eval.centralized else {}
    if then is not None:
        then(arrays)
    return central


def evaluate_round(
    cfg: RunConfig,
    grid: GridLike,
    state: ServerState,
    rnd: int,
    record: RoundRecord,
    evaluate: Evaluate,
    then: OnFinal | None = None,
) -> None:
    """Centralized and federated ``eval.metrics`` of the current global adapter, into ``record``; when the
    sites run elsewhere, ``then(adapter)`` is told right after the centralized evaluation, while the
    sites' replies are still awaited (the server's model is free from then on)."""
    central: Mapping[str, float]
    started = time.perf_counter()
    if cfg.compression.downlink != "none":  # evaluate exactly what the sites will receive
        state.global_arrays = traffic.received_adapter(cfg, state, rnd)
    if getattr(grid, "in_process", False):  # sites share this process's model: one at a time
        central = evaluate(state.global_arrays, cfg) if cfg.eval.centralized else {}
        federated = federated_eval(cfg, grid, state, rnd, record)
    else:  # the server's own eval overlaps with the sites' eval instead of running before it
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_central, evaluate, state.global_arrays, cfg, then)
            federated = federated_eval(cfg, grid, state, rnd, record)
            central = pending.result()
    record.scores = site_metrics.scores(cfg.eval.metric_names(), central, federated)
    record.time["eval"] = time.perf_counter() - started
