"""The round loop driven by a fake grid: sampling, aggregation, failures by node, min-replies; a
secret sample under amplification, the sites' seconds and federated evaluation under DP."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict

from fedtune.config.plan import Plan
from fedtune.core.arrays import Arrays
from fedtune.server import checkpoint, loop
from fedtune.server.outputs import WEIGHTS_FILE
from fedtune.server.participants import redact
from fedtune.server.record import RoundRecord
from fedtune.server.state import ServerState
from fedtune.wire import keys
from fedtune.wire.records import float32_records, read_arrays

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
    return Message(RecordDict({**float32_records(delta_for(node), keys.DELTA), keys.METRICS: metrics}), reply_to=msg)


def run_loop(cfg: Plan, grid: FakeGrid) -> tuple[ServerState, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    state = ServerState(round=0, global_arrays=dict(GLOBAL), rng=np.random.default_rng(cfg.base.seed))
    state = loop.run(
        cfg, grid, state, evaluate=lambda arrays, cfg: {}, on_round=lambda s, row: rows.append(row.to_json())
    )
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
                RecordDict({**float32_records(bad, keys.DELTA), keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3})}),
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
    sent = read_arrays(train.content, keys.ADAPTER)
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
                        Message(RecordDict({**float32_records(delta, keys.DELTA), keys.METRICS: metrics}), reply_to=msg)
                    ]
            return []

    plan = Plan.from_flat({"num-server-rounds": 1, "server.min-clients": 40, "eval.federated": False})
    state = ServerState(round=0, global_arrays=dict(big), rng=np.random.default_rng(0), history=[RoundRecord(round=0)])

    # Execute
    tracemalloc.start()
    state = loop.run(plan, LazyGrid(list(range(1, 41))), state, evaluate=lambda a, c: {}, on_round=lambda s, r: None)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    # Assert: the mean of node ids 1..40 is 20.5, and the peak is a few deltas, not 40 (160 MiB)
    np.testing.assert_allclose(state.global_arrays["m.lora_A.weight"], 20.5)
    assert peak < 40, peak


# Distinctive node ids: one that reaches an output or the log is found by its text.
NODES = [7_000_000_000 + i for i in range(64)]
CENTRAL = {"privacy.mechanism": "central", "privacy.noise-multiplier": 1.0, "strategy.weighting": "uniform"}
POISSON = {"server.sampling": "poisson", "server.fraction-train": 0.5}


def clipped(msg: Message) -> Message:
    """An honest reply whose delta (norm 0.004) fits under any clip norm used here."""
    if msg.metadata.message_type == "evaluate":
        return honest(msg)
    delta = {k: np.full(v.shape, 1e-3, np.float32) for k, v in GLOBAL.items()}
    metrics = MetricRecord({keys.NUM_EXAMPLES: 5, keys.UNDER_CLIP: 1, keys.TIME_TRAIN: 5.0, keys.TIME_LOAD: 1.0})
    return Message(RecordDict({**float32_records(delta, keys.DELTA), keys.METRICS: metrics}), reply_to=msg)


def half_fail(msg: Message) -> Message:
    """Nodes at even positions err with a reason that names them; the others reply honestly."""
    node = msg.metadata.dst_node_id
    if msg.metadata.message_type == "train" and NODES.index(node) % 2 == 0:
        return Message(Error(code=1, reason=f"client {node} ran out of memory"), reply_to=msg)
    return clipped(msg)


def trained(grid: FakeGrid) -> list[int]:
    """The nodes a train message went to: the sample."""
    return sorted(m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train")


@contextmanager
def fedtune_log() -> Iterator[list[str]]:
    """Every message fedtune logs at INFO and above while the block runs."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("fedtune")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def write_weights(directory: Path, arrays: Arrays) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(directory / WEIGHTS_FILE))


@pytest.mark.parametrize(
    ("flat", "same"),
    [
        ({**CENTRAL, **POISSON}, False),  # amplification by client sampling: the sample must be secret
        ({**CENTRAL, "server.fraction-train": 0.5}, True),  # central, fixed-size: no amplification claimed
        (POISSON, True),  # no DP: seeded and reproducible
    ],
)
def test_the_sample_follows_the_seed_only_where_no_amplification_is_claimed(
    task_identity: None, flat: dict[str, Any], same: bool
) -> None:
    # Prepare: two runs of one round with the same seed, 64 nodes, q = 0.5
    plan = Plan.from_flat({"num-server-rounds": 1, "seed": 7, **flat})
    grids = [FakeGrid(NODES, clipped), FakeGrid(NODES, clipped)]

    # Execute: each run gets the seeded generator the server app gives a new run
    for grid in grids:
        run_loop(plan, grid)

    # Assert: two independent Poisson samples of 64 nodes coincide with probability 2^-64
    first, second = trained(grids[0]), trained(grids[1])
    assert first and second
    assert (first == second) is same


@pytest.mark.parametrize("log_participants", [False, True])
def test_a_secret_sample_names_no_node_in_rows_logs_or_checkpoints_unless_asked(
    task_identity: None, tmp_path: Path, log_participants: bool
) -> None:
    # Prepare: central DP with Poisson sampling; about half the sampled nodes fail, naming themselves
    flat = {
        "num-server-rounds": 1,
        **CENTRAL,
        **POISSON,
        **({"output.log-participants": True} if log_participants else {}),
    }
    grid = FakeGrid(NODES, half_fail)
    state = ServerState(round=0, global_arrays=dict(GLOBAL), rng=np.random.default_rng(0))
    rows: list[dict[str, Any]] = []

    def on_round(s: ServerState, row: RoundRecord) -> None:
        checkpoint.save(tmp_path, s, Plan.from_flat(flat), write_weights)
        rows.append(row.to_json())

    # Execute: one round, then a resumed run for round 2 from its checkpoint
    with fedtune_log() as lines:
        loop.run(Plan.from_flat(flat), grid, state, evaluate=lambda a, c: {}, on_round=on_round)
        resumed = checkpoint.load(checkpoint.latest(tmp_path))
        plan2 = Plan.from_flat({**flat, "num-server-rounds": 2})
        resumed = loop.run(
            plan2, grid, resumed, evaluate=lambda a, c: {}, on_round=lambda s, r: rows.append(r.to_json())
        )

    # Assert: the sampler's state is never saved; the resumed run finishes round 2
    saved = (checkpoint.latest(tmp_path) / checkpoint.STATE_FILE).read_text()
    assert "rng" not in json.loads(saved)
    assert resumed.round == 2 and [r["round"] for r in rows] == [0, 1, 2]
    row = rows[1]
    sample = sorted({m.metadata.dst_node_id for m in grid.sent if m.metadata.group_id == "1"})
    assert row["sampled"] == len(sample) and row["failed"] == len([n for n in sample if NODES.index(n) % 2 == 0])
    assert row["failed"] > 0
    outputs = json.dumps(rows) + saved + "\n".join(lines)
    named = [n for n in NODES if str(n) in outputs]
    if log_participants:
        assert row["sampled_nodes"] == sample and all(str(f["node"]) in f["reason"] for f in row["failures"])
        assert named
    else:
        assert named == []
        assert all(f == {"reason": "client error: client <node> ran out of memory"} for f in row["failures"])
        assert not {"sampled_nodes", "replied_nodes", "bytes_per_client"} & set(row)


def test_under_dp_the_round_time_holds_no_site_seconds(task_identity: None) -> None:
    # Prepare: every reply claims 1 s of loading and 5 s of training
    plans = {
        m: Plan.from_flat({"num-server-rounds": 1, **(CENTRAL if m == "central" else {})}) for m in ("none", "central")
    }

    # Execute
    times = {m: run_loop(plan, FakeGrid([1, 2, 3], clipped))[1][1]["time"] for m, plan in plans.items()}

    # Assert: without DP the sites' seconds are summed; under DP they are ignored
    assert times["none"]["train"] == 15.0 and times["none"]["load"] == 3.0
    assert not {"load", "train", "serialize", "transport"} & set(times["central"])
    assert times["central"]["round_trip"] >= 0


@pytest.mark.parametrize(
    ("flat", "evaluated"),
    [
        ({}, True),
        ({"eval.federated": False}, False),
        (CENTRAL, False),  # auto: off under a DP mechanism
        ({"privacy.mechanism": "local", "privacy.noise-multiplier": 1.0}, False),
        ({**CENTRAL, "eval.federated": True}, True),  # an explicit true is kept
    ],
)
def test_federated_evaluation_is_off_by_default_under_dp(
    task_identity: None, flat: dict[str, Any], evaluated: bool
) -> None:
    # Prepare
    grid = FakeGrid([1, 2, 3], clipped)

    # Execute
    _, rows = run_loop(Plan.from_flat({"num-server-rounds": 1, **flat}), grid)

    # Assert: rounds 0 and 1 evaluate at every site, or at none
    asked = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(asked) == (6 if evaluated else 0)
    assert (rows[1]["eval_loss_federated"] is not None) is evaluated


def test_redacting_a_secagg_row_keeps_its_counts_and_reasons_but_no_id() -> None:
    # Prepare: a SecAgg+ round's row as secagg_round fills it, with ids in lists, keys and texts
    a, b, c = NODES[:3]
    row: dict[str, Any] = {
        "round": 1,
        "sampled": 3,
        "replied": 2,
        "failed": 1,
        "sampled_nodes": [a, b, c],
        "replied_nodes": [a, c],
        "bytes_per_client": {str(a): {"up": 1, "down": 2}},
        "failures": [{"node": b, "reason": f"secagg masked: client {b} got shares from {a}, norm 1.5."}],
        "secagg": {"survivors": 2, "dropped": [b], "recovered": [b], "abandoned": f"cannot rebuild client {b}."},
    }

    # Execute
    record = RoundRecord.from_json(row)
    redact(record, [a, b, c])
    row = record.to_json()

    # Assert: ids go, counts and other numbers stay
    assert not any(str(n) in json.dumps(row) for n in (a, b, c))
    assert row["failures"] == [{"reason": "secagg masked: client <node> got shares from <node>, norm 1.5."}]
    assert row["secagg"] == {"survivors": 2, "abandoned": "cannot rebuild client <node>."}
    assert (row["sampled"], row["replied"], row["failed"]) == (3, 2, 1)
    assert not {"sampled_nodes", "replied_nodes", "bytes_per_client"} & set(row)


def test_an_aggregate_that_fails_on_a_checked_reply_is_not_applied(
    task_identity: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the aggregator itself fails on node 3's reply (a server bug, not the site's fault)
    from fedtune.strategies.aggregators import WeightedMean

    real = WeightedMean.add

    def add(self: WeightedMean, delta: dict[str, np.ndarray], weight: float, **kw: Any) -> None:
        real(self, delta, weight, **kw)  # node 3's delta is in the sum by now
        if weight == 3:
            raise RuntimeError("bug")

    monkeypatch.setattr(WeightedMean, "add", add)
    cfg = Plan.from_flat({"num-server-rounds": 1, "server.min-clients": 3, "eval.federated": False})

    # Execute
    with caplog.at_level(logging.ERROR, logger="fedtune"):
        state, rows = run_loop(cfg, FakeGrid([1, 2, 3], honest))

    # Assert: the round goes on, names the node, logs the traceback, and applies nothing
    assert rows[1]["updated"] is False
    assert rows[1]["failures"] == [{"node": 3, "reason": "the server failed to aggregate it (RuntimeError: bug)"}]
    (error,) = caplog.records
    assert "adding node 3's checked reply failed" in error.getMessage() and error.exc_info is not None
    for key, value in GLOBAL.items():
        np.testing.assert_array_equal(state.global_arrays[key], value)


@pytest.mark.parametrize("in_process", [False, True])
def test_the_final_adapter_is_handed_on_once_after_the_last_central_eval(in_process: bool, task_identity: None) -> None:
    # Prepare: 3 rounds; the server's evaluations and the hand-over are recorded in order
    plan = Plan.from_flat({"num-server-rounds": 3, "server.min-clients": 3, "eval.federated": True})
    grid = FakeGrid([1, 2, 3], honest)
    grid.in_process = in_process  # type: ignore[attr-defined]  # the sites would share the server's model
    events: list[tuple[str, dict[str, np.ndarray]]] = []

    def evaluate(arrays: dict[str, np.ndarray], cfg: Any) -> dict[str, float]:
        events.append(("central", arrays))
        return {}

    state = ServerState(round=0, global_arrays=dict(GLOBAL), rng=np.random.default_rng(0))

    # Execute
    state = loop.run(
        plan, grid, state, evaluate=evaluate, on_round=lambda s, r: None, on_final=lambda a: events.append(("final", a))
    )

    # Assert: once, right after the last round's central evaluation, with the final adapter; never in-process
    finals = [i for i, (what, _) in enumerate(events) if what == "final"]
    if in_process:
        assert finals == [] and len(events) == 4
        return
    assert finals == [len(events) - 1] and events[-2][0] == "central" and len(events) == 5
    assert events[-1][1] is events[-2][1]
    for key in GLOBAL:
        np.testing.assert_array_equal(events[-1][1][key], state.global_arrays[key])


def test_a_run_stopped_by_its_budget_hands_on_no_final_adapter(task_identity: None) -> None:
    # Prepare: the byte budget stops the run before its last planned round (the answers come at the end then)
    adapter = run_loop(Plan.from_flat({"num-server-rounds": 1, "server.min-clients": 3}), FakeGrid([1, 2, 3], honest))
    used = sum(r["bytes_up"] + r["bytes_down"] for r in adapter[1])
    plan = Plan.from_flat({"num-server-rounds": 3, "server.min-clients": 3, "communication.budget-mb": used / 1e6})
    finals: list[object] = []
    state = ServerState(round=0, global_arrays=dict(GLOBAL), rng=np.random.default_rng(0))

    # Execute
    state = loop.run(
        plan,
        FakeGrid([1, 2, 3], honest),
        state,
        evaluate=lambda a, c: {},
        on_round=lambda s, r: None,
        on_final=finals.append,
    )

    # Assert
    assert state.round == 1 and state.communication_stopped and finals == []
