"""Communication in the round loop (fake grid): bytes per client, the byte budget, a compressed
downlink that server and clients share, malformed compressed replies, and the plan checker."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, Message, MetricRecord, RecordDict

from fedtune.config.plan import Plan
from fedtune.core.errors import IncompatibleComponentsError
from fedtune.privacy import compat
from fedtune.server import loop, traffic
from fedtune.server.state import ServerState
from fedtune.wire import keys
from fedtune.wire.codec import PACKED, Scheme, index_bytes, make_index, rng_for
from fedtune.wire.records import decode, encode
from tests.unit.test_loop import GLOBAL, FakeGrid, honest, run_loop


def _npy(array: np.ndarray) -> int:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return len(buf.getvalue())


def _float32_message(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of ``arrays`` as lossless float32 on the wire: numpy's npy of their bytes, one uint8
    array, plus the index (names and shapes)."""
    payload = np.concatenate([np.asarray(v, "<f4").ravel() for v in arrays.values()]).view(np.uint8)
    index = make_index({k: v.shape for k, v in arrays.items()}, Scheme("float32", 256, 0.1))
    return _npy(payload) + index_bytes(index)


def test_a_budget_for_exactly_k_rounds_runs_k_rounds_and_is_never_exceeded(task_identity: None) -> None:
    # Prepare: reference sizes from numpy's own npy writer; 3 sites, float32 (the default) both ways
    adapter = _float32_message(GLOBAL)
    round0 = 3 * adapter  # federated eval only
    per_round = 3 * adapter + 3 * adapter + 3 * adapter  # train down, delta up, eval down
    k = 2
    budget = round0 + k * per_round + per_round - 1  # one byte short of a third round
    plan = Plan.from_flat({"num-server-rounds": 5, "server.min-clients": 3, "communication.budget-mb": budget / 1e6})

    # Execute
    state, rows = run_loop(plan, FakeGrid([1, 2, 3], honest))

    # Assert
    assert [r["round"] for r in rows] == [0, 1, 2]
    total = sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    assert total == round0 + k * per_round <= budget
    assert state.communication_stopped is not None and "before round 3" in state.communication_stopped
    for row in rows[1:]:
        assert row["bytes_per_client"] == {str(n): {"up": adapter, "down": 2 * adapter} for n in (1, 2, 3)}
        assert set(row["time"]) >= {"load", "train", "serialize", "transport", "aggregate", "eval"}
    assert traffic.communication_summary(plan.base, state)["stopped"] == state.communication_stopped


def test_compressed_downlink_is_the_global_adapter_the_server_steps_from(task_identity: None) -> None:
    # Prepare: sites decode what they get and send a fixed delta against it (plain uplink)
    scheme = Scheme("int8", 4, 0.1)
    received: list[tuple[int, str, dict[str, np.ndarray]]] = []

    def site(msg: Message) -> Message:
        arrays = decode(msg.content, keys.ADAPTER, scheme)
        node = msg.metadata.dst_node_id
        received.append((node, msg.metadata.message_type, arrays))
        return honest(msg)

    global_arrays = {k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}
    plan = Plan.from_flat(
        {"num-server-rounds": 2, "server.min-clients": 2, "compression.downlink": "int8", "compression.block-size": 4}
    )
    grid = FakeGrid([1, 2], site)

    # Execute
    state = ServerState(round=0, global_arrays=dict(global_arrays), rng=np.random.default_rng(0))
    rows: list[dict[str, object]] = []
    state = loop.run(plan, grid, state, evaluate=lambda a, c: {}, on_round=lambda s, r: rows.append(r.to_json()))

    # Assert: everyone got the same adapter each time; the server stepped from exactly it
    train1 = [a for _, kind, a in received if kind == "train"][:2]
    for key in GLOBAL:
        np.testing.assert_array_equal(train1[0][key], train1[1][key])
        assert np.abs(train1[0][key] - global_arrays[key]).max() <= np.abs(global_arrays[key]).max() / 127 + 1e-7
    step = (1 * 1 + 2 * 2) / 3  # examples-weighted mean of deltas 1 and 2
    evals = [a for _, kind, a in received if kind == "evaluate"]
    for key in GLOBAL:
        # round 1's eval adapter is the stepped global, re-encoded; round 2 trains from exactly it
        after1 = evals[2][key]
        np.testing.assert_allclose(after1, train1[0][key] + step, atol=np.abs(after1).max() / 127 + 1e-6)
        np.testing.assert_array_equal([a for _, kind, a in received if kind == "train"][2][key], after1)
        np.testing.assert_array_equal(state.global_arrays[key], evals[-1][key])
    records, _ = encode(global_arrays, keys.ADAPTER, scheme, rng_for(0, 0, "server"))
    packed = records[keys.ADAPTER][PACKED].numpy()  # type: ignore[index, union-attr]
    down = _npy(packed) + index_bytes(dict(records[keys.WIRE]))  # type: ignore[call-overload]
    adapter = _float32_message(GLOBAL)  # uplink `none`
    assert rows[1]["bytes_per_client"] == {str(n): {"up": adapter, "down": 2 * down} for n in (1, 2)}
    assert rows[1]["bytes_down"] == 4 * down  # train + eval to two sites


def test_the_received_adapter_is_returned_not_swapped_into_the_state() -> None:
    # Prepare: a global adapter off the int8 grid
    plan = Plan.from_flat({"compression.downlink": "int8", "compression.block-size": 4})
    original = {k: np.random.default_rng(1).normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}
    state = ServerState(round=0, global_arrays=original, rng=np.random.default_rng(0))
    scheme = Scheme.of(plan.base.compression, "downlink")

    # Execute
    received = traffic.received_adapter(plan.base, state, 1)
    untouched = state.global_arrays
    state.global_arrays = received
    sent = decode(RecordDict(traffic.adapter_records(plan.base, state, 1, None)), keys.ADAPTER, scheme)

    # Assert: nothing changes until the caller assigns; what is sent decodes to what was adopted
    assert untouched is original
    for key in GLOBAL:
        np.testing.assert_array_equal(sent[key], received[key])
        assert not np.array_equal(received[key], original[key])
    assert traffic.received_adapter(plan.base, state, 2) is received  # already on the grid: kept as is


def test_a_malformed_compressed_reply_is_refused_naming_the_node(task_identity: None) -> None:
    # Prepare: node 2 truncates its packed int8 update
    scheme = Scheme("int8", 256, 0.1)

    def handler(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == "evaluate":
            return honest(msg)
        delta = {k: np.full(v.shape, float(node), np.float32) for k, v in GLOBAL.items()}
        records, _ = encode(delta, keys.DELTA, scheme, rng_for(0, 1, str(node)))
        if node == 2:
            packed = records[keys.DELTA][PACKED].numpy()  # type: ignore[index, union-attr]
            records[keys.DELTA][PACKED] = Array(packed[:-3])  # type: ignore[index]
        metrics = MetricRecord({keys.NUM_EXAMPLES: 1})
        return Message(RecordDict({**records, keys.METRICS: metrics}), reply_to=msg)

    plan = Plan.from_flat({"num-server-rounds": 1, "server.min-clients": 2, "compression.uplink": "int8"})

    # Execute
    state, rows = run_loop(plan, FakeGrid([1, 2], handler))

    # Assert: node 1's update went in (up to int8 rounding), node 2 is named with the reason
    assert rows[1]["failures"] == [{"node": 2, "reason": rows[1]["failures"][0]["reason"]}]
    assert "bytes, its index and scheme say" in rows[1]["failures"][0]["reason"]
    for key, value in GLOBAL.items():
        np.testing.assert_allclose(state.global_arrays[key], value + 1.0, atol=1 / 127)


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"secagg.protocol": "secagg", "compression.uplink": "int8"}, "compression.uplink` = int8 under `secagg"),
        ({"plan.2-.secagg.protocol": "secagg", "communication.budget-mb": 10.0}, "rounds 2-3: `communication.budget"),
    ],
)
def test_plan_checker_refuses_what_breaks_secure_aggregation(flat: dict[str, object], match: str) -> None:
    # Prepare
    plan = Plan.from_flat({"num-server-rounds": 3, "server.min-clients": 3, **flat})

    # Execute / Assert
    with pytest.raises(IncompatibleComponentsError, match=match):
        compat.check(plan)


def test_downlink_compression_is_allowed_under_secure_aggregation() -> None:
    # Prepare
    plan = Plan.from_flat({"server.min-clients": 3, "secagg.protocol": "secagg", "compression.downlink": "int8"})

    # Execute / Assert
    assert compat.problems(plan) == []


def test_central_dp_clips_each_decoded_delta_to_c_again(task_identity: None) -> None:
    # Prepare: each site clips its delta to norm C = 1 exactly; int8 rounding then moves it past C
    scheme = Scheme("int4", 256, 0.1)
    sent: dict[int, dict[str, np.ndarray]] = {}

    def handler(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        rng = np.random.default_rng(node)
        raw = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}
        norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in raw.values()))
        records, _ = encode({k: v / np.float32(norm) for k, v in raw.items()}, keys.DELTA, scheme, rng)
        sent[node] = decode(RecordDict(dict(records)), keys.DELTA, scheme)  # before the server releases it
        metrics = MetricRecord({keys.NUM_EXAMPLES: 5, keys.UNDER_CLIP: 0})
        return Message(RecordDict({**records, keys.METRICS: metrics}), reply_to=msg)

    plan = Plan.from_flat(
        {
            "num-server-rounds": 1,
            "server.min-clients": 4,
            "eval.federated": False,
            "privacy.mechanism": "central",
            "strategy.weighting": "uniform",
            "privacy.noise-multiplier": 0.0,
            "compression.uplink": "int4",
        }
    )

    # Execute
    state, rows = run_loop(plan, FakeGrid([1, 2, 3, 4], handler))

    # Assert: both accepted; the step is the mean of the decoded deltas, each clipped to C with numpy
    assert rows[1]["replied"] == 4 and rows[1]["failed"] == 0
    clipped = []
    for decoded in sent.values():
        norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in decoded.values()))
        clipped.append({k: v / max(norm, 1.0) for k, v in decoded.items()})
        assert norm < 1.2
    assert any(  # the rounding did push some past C
        np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in d.values())) > 1.0 for d in sent.values()
    )
    for key, value in GLOBAL.items():
        want = value + sum(c[key] for c in clipped) / 4
        np.testing.assert_allclose(state.global_arrays[key], want, rtol=1e-5, atol=1e-6)
