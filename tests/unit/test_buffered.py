"""Buffered asynchronous rounds (``server.mode = async``) driven by a grid with a virtual clock: which replies
make each version, their staleness, stale replies dropped, and the global adapter against a numpy replay of
FedBuff on the same schedule."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedtune.config.plan import Plan
from fedtune.server import loop
from fedtune.server.state import ServerState
from fedtune.wire import keys
from fedtune.wire.records import float32_records, read_arrays

GLOBAL = {"m.lora_A.weight": np.ones((2, 4), np.float32), "m.lora_B.weight": np.zeros((4, 2), np.float32)}
DURATION = {1: 1, 2: 1, 3: 5}  # virtual seconds a site takes: node 3 is five times slower


def site_delta(node: int, received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a site sends: it depends on the global it started from, so a stale start shows."""
    return {k: (node - 0.5 * v).astype(np.float32) for k, v in received.items()}


class VirtualGrid:
    """Each train message finishes ``DURATION[node]`` virtual seconds after it is pushed; a pull returns the
    earliest unfinished one (ties in push order) and moves the clock there. Evaluation answers at once."""

    def __init__(self) -> None:
        self.now, self.count = 0.0, 0
        self.queue: list[tuple[float, int, str, Message]] = []
        self.sent: list[tuple[int, int]] = []  # (node, seed round)

    def get_node_ids(self) -> Iterable[int]:
        return list(DURATION)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = message_id = f"m{self.count}"
            node = msg.metadata.dst_node_id
            self.sent.append((node, int(msg.content.config_records[keys.SPEC][keys.ROUND])))
            heapq.heappush(self.queue, (self.now + DURATION[node], self.count, message_id, self._answer(msg)))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        for item in sorted(self.queue):
            if item[2] in wanted:
                self.queue.remove(item)
                heapq.heapify(self.queue)
                self.now = max(self.now, item[0])
                return [item[3]]
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("async streams replies")

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        received = read_arrays(msg.content, keys.ADAPTER)
        metrics = MetricRecord({keys.TRAIN_LOSS: float(node), keys.NUM_EXAMPLES: 10 * node})
        records = {**float32_records(site_delta(node, received), keys.DELTA), keys.METRICS: metrics}
        return Message(RecordDict(records), reply_to=msg)


def run_async(flat: dict[str, Any]) -> tuple[ServerState, list[dict[str, Any]], VirtualGrid]:
    base = {"server.mode": "async", "server.min-clients": 3, "server.buffer-size": 2, "eval.federated": False}
    plan = Plan.from_flat({**base, **flat})
    grid, rows = VirtualGrid(), []
    state = ServerState(round=0, global_arrays=dict(GLOBAL), rng=np.random.default_rng(0))
    state = loop.run(plan, grid, state, evaluate=lambda a, c: {}, on_round=lambda s, r: rows.append(r.to_json()))
    return state, rows, grid


# The schedule the virtual clock gives (K = 2): (node, start version) of each version's two replies. Nodes 1
# and 2 finish every second and are sent the latest global each time; node 3, sent version 0 at t = 0,
# answers at t = 5, when version 4 is out.
SCHEDULE = {1: [(1, 0), (2, 0)], 2: [(1, 0), (2, 1)], 3: [(1, 1), (2, 2)], 4: [(1, 2), (2, 3)], 5: [(3, 0), (1, 3)]}


def replay(schedule: dict[int, list[tuple[int, int]]], weight: Any) -> dict[str, np.ndarray]:
    """FedBuff with fedavg (server lr 1) in numpy: v = v-1 + sum(n_i s(tau_i) delta_i) / sum(n_i)."""
    versions = [{k: v.astype(np.float64) for k, v in GLOBAL.items()}]
    for version in sorted(schedule):
        pairs = schedule[version]
        parts = [(10 * n, weight(version - 1 - start), site_delta(n, versions[start])) for n, start in pairs]
        total = sum(n for n, _, _ in parts)
        step = {k: sum(n * s * d[k] for n, s, d in parts) / total for k in GLOBAL}
        versions.append({k: versions[-1][k] + step[k] for k in GLOBAL})
    return versions[-1]


def test_versions_follow_fedbuff_with_polynomial_staleness_weights(task_identity: None) -> None:
    # Execute
    state, rows, grid = run_async({"num-server-rounds": 5})

    # Assert: one row per version with its contributors and their staleness, as the schedule says
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5] and [r.get("version") for r in rows[1:]] == [1, 2, 3, 4, 5]
    for row in rows[1:]:
        expected = [{"node": n, "staleness": row["version"] - 1 - start} for n, start in SCHEDULE[row["version"]]]
        assert row["contributors"] == expected
        assert set(row["idle_seconds"]) == {"1", "2", "3"} and row["replied"] == 2 and row["updated"] is True
    assert rows[5]["train_loss"] == pytest.approx((30 * 3 + 10 * 1) / 40)
    ref = replay(SCHEDULE, lambda s: (1 + s) ** -0.5)
    for key in GLOBAL:
        np.testing.assert_allclose(state.global_arrays[key], ref[key], rtol=1e-5, atol=1e-6)
    rounds = [r for _, r in grid.sent]
    assert len(rounds) == len(set(rounds))  # two sends from one version never share a seed


def test_a_reply_staler_than_max_staleness_is_dropped_and_logged(
    task_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute: node 3's reply (staleness 4) arrives while version 5 fills
    state, rows, _ = run_async({"num-server-rounds": 5, "server.max-staleness": 3, "strategy.staleness": "constant"})

    # Assert: dropped, named in the row and the log; version 5 is made of the next two replies
    assert rows[5]["failures"] == [{"node": 3, "reason": "staleness 4 > `server.max-staleness` = 3; dropped"}]
    assert "staleness 4 > `server.max-staleness` = 3" in caplog.text
    schedule = {**SCHEDULE, 5: [(1, 3), (2, 4)]}
    assert rows[5]["contributors"] == [{"node": 1, "staleness": 1}, {"node": 2, "staleness": 0}]
    ref = replay(schedule, lambda s: 1.0)
    for key in GLOBAL:
        np.testing.assert_allclose(state.global_arrays[key], ref[key], rtol=1e-5, atol=1e-6)


def test_concurrency_limits_the_sites_training_at_once(task_identity: None) -> None:
    # Execute: one site at a time; K = 1
    _, rows, grid = run_async({"num-server-rounds": 4, "server.concurrency": 1, "server.buffer-size": 1})

    # Assert: the longest-idle site goes next, and nobody is stale (one site in flight at a time)
    assert [node for node, _ in grid.sent] == [1, 2, 3, 1]
    assert all(r["contributors"][0]["staleness"] == 0 for r in rows[1:])
