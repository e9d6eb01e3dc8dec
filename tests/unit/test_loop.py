"""The round loop driven by a fake grid: sampling, aggregation, failures by node, min-replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict

from fedtune.config.plan import Plan
from fedtune.server import loop
from fedtune.server.state import ServerState
from fedtune.wire import keys
from fedtune.wire.records import arrays_from_record, record_from_arrays

GLOBAL = {"m.lora_A.weight": np.ones((2, 4), np.float32), "m.lora_B.weight": np.zeros((4, 2), np.float32)}
Handler = Callable[[Message], Message | None]


class FakeGrid:
    """Answers each message with ``handler(msg)``; None means the node never replies."""

    def __init__(self, nodes: list[int], handler: Handler) -> None:
        self.nodes = nodes
        self.handler = handler
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            self.sent.append(msg)
            reply = self.handler(msg)
            if reply is not None:
                out.append(reply)
        return out


def delta_for(node: int) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, float(node), np.float32) for k, v in GLOBAL.items()}


def honest(msg: Message) -> Message:
    node = msg.metadata.dst_node_id
    if msg.metadata.message_type == "evaluate":
        metrics = MetricRecord({keys.EVAL_LOSS: 1.0 / node, keys.NUM_EXAMPLES: 10})
        return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)
    metrics = MetricRecord({keys.TRAIN_LOSS: 2.0, keys.NUM_EXAMPLES: node})
    return Message(RecordDict({keys.DELTA: record_from_arrays(delta_for(node)), keys.METRICS: metrics}), reply_to=msg)


def run_loop(cfg: Plan, grid: FakeGrid) -> tuple[ServerState, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    state = ServerState(round=0, global_arrays=dict(GLOBAL), rng=np.random.default_rng(cfg.base.seed))
    state = loop.run(cfg, grid, state, evaluate=lambda arrays, cfg: {}, on_round=lambda s, row: rows.append(row))
    return state, rows


def test_rounds_average_deltas_weighted_by_examples(task_identity: None) -> None:
    # Prepare
    cfg = Plan.from_flat({"num-server-rounds": 2, "server.min-clients": 3})
    grid = FakeGrid([1, 2, 3], honest)

    # Execute
    state, rows = run_loop(cfg, grid)

    # Assert: each round adds sum(n * n) / sum(n) = 14 / 6 to every entry
    step = (1 * 1 + 2 * 2 + 3 * 3) / 6
    for key, value in GLOBAL.items():
        np.testing.assert_allclose(state.global_arrays[key], value + 2 * step, rtol=1e-6)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["sampled"] == 3 and rows[1]["replied"] == 3 and rows[1]["failed"] == 0
    assert rows[1]["eval_loss"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    spec = grid.sent[-1].content.config_records[keys.SPEC]
    assert spec[keys.ROUND] == 2 and spec["lora.r"] == cfg.base.lora.r


def test_failures_are_recorded_by_node_and_round_completes(task_identity: None) -> None:
    # Prepare: node 2 errors, node 3 sends NaN, node 4 never answers, node 1 is fine
    def handler(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == "evaluate" or node == 1:
            return honest(msg)
        if node == 2:
            return Message(Error(code=1, reason="disk full"), reply_to=msg)
        if node == 3:
            bad = delta_for(3)
            bad["m.lora_B.weight"][0, 0] = np.nan
            return Message(
                RecordDict({keys.DELTA: record_from_arrays(bad), keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3})}),
                reply_to=msg,
            )
        return None

    cfg = Plan.from_flat({"num-server-rounds": 1, "server.min-clients": 4, "eval.federated": False})

    # Execute
    state, rows = run_loop(cfg, FakeGrid([1, 2, 3, 4], handler))

    # Assert
    row = rows[1]
    assert (row["sampled"], row["replied"], row["failed"]) == (4, 1, 3)
    reasons = {f["node"]: f["reason"] for f in row["failures"]}
    assert "disk full" in reasons[2] and "NaN" in reasons[3] and "round-timeout" in reasons[4]
    np.testing.assert_allclose(state.global_arrays["m.lora_A.weight"], GLOBAL["m.lora_A.weight"] + 1.0)


def test_too_few_replies_leave_adapter_unchanged(task_identity: None) -> None:
    # Prepare
    cfg = Plan.from_flat({"num-server-rounds": 1, "server.min-clients": 3, "server.min-replies": 2})
    grid = FakeGrid(
        [1, 2, 3],
        lambda m: honest(m) if m.metadata.dst_node_id == 1 or m.metadata.message_type == "evaluate" else None,
    )

    # Execute
    state, rows = run_loop(cfg, grid)

    # Assert
    assert rows[1]["updated"] is False and rows[1]["replied"] == 1
    for key, value in GLOBAL.items():
        np.testing.assert_array_equal(state.global_arrays[key], value)


def test_sampling_is_seeded_and_respects_fraction(task_identity: None) -> None:
    # Prepare
    cfg = Plan.from_flat({"num-server-rounds": 3, "server.fraction-train": 0.3, "server.min-clients": 2, "seed": 7})
    nodes = list(range(100, 110))

    # Execute
    _, rows_a = run_loop(cfg, FakeGrid(nodes, honest))
    _, rows_b = run_loop(cfg, FakeGrid(nodes, honest))

    # Assert
    picked = [r["sampled_nodes"] for r in rows_a[1:]]
    assert picked == [r["sampled_nodes"] for r in rows_b[1:]]
    assert all(len(p) == 3 and set(p) <= set(nodes) for p in picked)
    assert len({tuple(p) for p in picked}) > 1


def test_train_message_carries_global_adapter(task_identity: None) -> None:
    grid = FakeGrid([1, 2], honest)
    run_loop(Plan.from_flat({"num-server-rounds": 1}), grid)
    train = next(m for m in grid.sent if m.metadata.message_type == "train")
    sent = arrays_from_record(train.content.array_records[keys.ADAPTER])
    for key, value in GLOBAL.items():
        np.testing.assert_array_equal(sent[key], value)


def test_plan_switches_strategy_and_fraction_per_round(task_identity: None) -> None:
    # Prepare
    plan = Plan.from_flat(
        {
            "num-server-rounds": 4,
            "server.min-clients": 2,
            "plan.3-.strategy.name": "fedadam",
            "plan.3-.strategy.server-lr": 0.1,
            "plan.3-.server.num-train": 2,
        }
    )
    grid = FakeGrid([1, 2, 3, 4], honest)

    # Execute
    state, rows = run_loop(plan, grid)

    # Assert
    assert [r["spec"]["strategy.name"] for r in rows[1:]] == ["fedavg", "fedavg", "fedadam", "fedadam"]
    assert [r["sampled"] for r in rows[1:]] == [4, 4, 2, 2]
    assert "adam" in state.optimizer_states
    sent = [m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.group_id == "3"]
    assert sent[0].content.config_records[keys.SPEC]["strategy.name"] == "fedadam"


class PushPullGrid(FakeGrid):
    """Flower's push/pull interface; node 3 is unreachable, so the SuperLink (node 1) answers."""

    def __init__(self, nodes: list[int]) -> None:
        super().__init__(nodes, honest)
        self.pending: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(msg)
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids):
            msg = self.pending.pop(mid, None)
            if msg is None:
                continue
            if msg.metadata.dst_node_id == 3:
                reply = Message(Error(code=3, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # what Flower's SuperLink sends
            else:
                reply = honest(msg)
            out.append(reply)
        return out


def test_an_unreachable_node_is_blamed_not_the_superlink(task_identity: None) -> None:
    # Execute
    _, rows = run_loop(
        Plan.from_flat({"num-server-rounds": 1, "server.min-clients": 3, "eval.federated": False}),
        PushPullGrid([2, 3, 4]),
    )

    # Assert
    assert (rows[1]["replied"], rows[1]["failed"]) == (2, 1)
    assert rows[1]["failures"] == [{"node": 3, "reason": "client error: Node Unavailable"}]


def test_server_memory_does_not_grow_with_the_number_of_replies(task_identity: None) -> None:
    # Prepare: 40 clients, each replying with a 4 MiB delta made only when its reply is pulled
    import tracemalloc

    big = {"m.lora_A.weight": np.zeros((256, 2048), np.float32), "m.lora_B.weight": np.zeros((2048, 256), np.float32)}

    class LazyGrid(PushPullGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            for mid in list(message_ids):
                msg = self.pending.pop(mid, None)
                if msg is not None:
                    node = msg.metadata.dst_node_id
                    delta = {k: np.full(v.shape, node, np.float32) for k, v in big.items()}
                    metrics = MetricRecord({keys.NUM_EXAMPLES: 1})
                    return [
                        Message(
                            RecordDict({keys.DELTA: record_from_arrays(delta), keys.METRICS: metrics}), reply_to=msg
                        )
                    ]
            return []

    plan = Plan.from_flat({"num-server-rounds": 1, "server.min-clients": 40, "eval.federated": False})
    state = ServerState(round=0, global_arrays=dict(big), rng=np.random.default_rng(0), history=[{"round": 0}])

    # Execute
    tracemalloc.start()
    state = loop.run(plan, LazyGrid(list(range(1, 41))), state, evaluate=lambda a, c: {}, on_round=lambda s, r: None)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    # Assert: the mean of node ids 1..40 is 20.5, and the peak is a few deltas, not 40 (160 MiB)
    np.testing.assert_allclose(state.global_arrays["m.lora_A.weight"], 20.5)
    assert peak < 40, peak
