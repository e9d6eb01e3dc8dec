"""Malformed replies against every server-side reply handler (issue 13, finding 4): the plain round, the
compressed round (each ``compression.uplink``), federated evaluation and each SecAgg+ stage.

Each kind of malformed reply comes from one node (``BAD``) among honest ones, its values drawn by
Hypothesis. Whatever it sends, no exception escapes, the bad node is in the round's failures with a
one-line reason (or, for a kind the server may accept, its reply is aggregated like any other), the
honest nodes' updates are aggregated exactly (numpy reference) and the global adapter stays finite.
"""

from __future__ import annotations

import io
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.errors import FedtuneError
from fedtune.model.task_metrics import ROUGE_L
from fedtune.privacy.secagg import flat, stages
from fedtune.privacy.secagg.masking import round_context
from fedtune.privacy.secagg.quantize import Quantizer, wire_dtype
from fedtune.server import eval_round, plain_round
from fedtune.server.record import RoundRecord
from fedtune.server.secagg_round import secagg_round
from fedtune.server.state import ServerState
from fedtune.server.validation import MAX_EXAMPLES, MAX_REASON
from fedtune.wire import keys
from fedtune.wire.codec import PACKED, Scheme, rng_for
from fedtune.wire.records import decode, encode, record_from_arrays

RANK = 2
GLOBAL = {
    "m.lora_A.weight": np.linspace(-0.5, 0.5, 2 * 4, dtype=np.float32).reshape(RANK, 4),
    "m.lora_B.weight": np.zeros((4, RANK), np.float32),
}
SHAPES = {k: v.shape for k, v in GLOBAL.items()}
GOOD, BAD = (1, 2, 3, 4), 9
NODES = [*GOOD, BAD]
EXAMPLES = {1: 3, 2: 5, 3: 7, 4: 2, BAD: 4}
SCHEMES = ["float32", "int16", "int8", "int4", "topk"]
NUMPY = "numpy.ndarray"
FUZZ = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# What the server must do with the bad node's reply.
REFUSED, ACCEPTED, DECLINED, ABANDONED, EITHER = "refused", "accepted", "declined", "abandoned", "either"
Records = dict[str, Any]
Draw = Callable[[st.SearchStrategy[Any]], Any]
Reply = Records | Error | list[Records | Error]
Mutation = Callable[[Draw, Records, Scheme | None], tuple[Reply, str]]
"""Turns an honest reply's records into a malformed reply, and says what the server must do with it."""
Kinds = dict[str, Mutation]


@pytest.fixture(scope="module", autouse=True)
def _task_identity() -> None:
    """Messages can be built outside a Flower runtime once a task identity is set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def delta_of(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.uniform(-0.02, 0.02, size=s).astype(np.float32) for k, s in SHAPES.items()}


class Grid:
    """Flower's batch ``send_and_receive``: each message is answered by ``answer(msg)``'s replies (0, 1 or 2)."""

    def __init__(self, answer: Callable[[Message], list[Message]]) -> None:
        self.answer = answer

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        return [reply for msg in messages for reply in self.answer(msg)]


def as_replies(msg: Message, reply: Reply) -> list[Message]:
    return [
        Message(r, reply_to=msg) if isinstance(r, Error) else Message(RecordDict(r), reply_to=msg)
        for r in (reply if isinstance(reply, list) else [reply])
    ]


def first_records(reply: Reply) -> Records | None:
    first = reply[0] if isinstance(reply, list) else reply
    return None if isinstance(first, Error) else first


def assert_failure(failures: dict[int, str], node: int) -> None:
    reason = failures[node]
    assert reason and "\n" not in reason and len(reason) <= MAX_REASON, reason


# Values a site may send where a count, a loss or an epsilon belongs.
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
INT64 = st.integers(-(2**63), 2**63 - 1)
BAD_COUNT = st.one_of(
    st.integers(-(2**63), 0),
    st.integers(MAX_EXAMPLES + 1, 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(1, 9), max_size=3),
)
BAD_LOSS = st.one_of(NON_FINITE, st.lists(st.floats(0, 9), max_size=3))
BAD_EPSILON = st.one_of(
    st.just(math.nan), st.floats(max_value=-1e-300), st.integers(-(2**63), -1), st.lists(st.floats())
)
BAD_RANK = st.one_of(st.integers(-(2**63), 0), st.integers(RANK + 1, 2**63 - 1), st.floats(0.5, 1.5))
GARBAGE = st.binary(max_size=300)


def garbage_array(draw: Draw) -> Array:
    """An Array whose bytes are not one npy array that agrees with its header (one of several ways)."""
    how = draw(st.sampled_from(["random", "zip", "huge header", "truncated", "trailing", "structured", "stype"]))
    honest = Array(np.zeros((4, 2), np.float32)).data
    if how == "random":
        data = draw(GARBAGE)
    elif how == "zip":  # numpy would open it as an .npz archive
        data = b"PK\x03\x04" + draw(GARBAGE)
    elif how == "huge header":  # numpy would allocate what the header claims before reading
        buf = io.BytesIO()
        shape = (draw(st.integers(2**31, 2**50)),)
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
        data = buf.getvalue() + draw(GARBAGE)
    elif how == "truncated":
        data = honest[: draw(st.integers(0, len(honest) - 1))]
    elif how == "trailing":
        data = honest + draw(st.binary(min_size=1, max_size=64))
    elif how == "structured":
        data = Array(np.zeros(3, dtype=[("a", "<f4")])).data
    else:
        return Array(dtype="float32", shape=(4, 2), stype="torch", data=honest)
    return Array(dtype="float32", shape=(4, 2), stype=NUMPY, data=data)


def replace_array(records: Records, record_key: str, name: str, array: Array) -> None:
    old = records[record_key]
    records[record_key] = ArrayRecord(OrderedDict((k, array if k == name else v) for k, v in old.items()))


def set_metric(records: Records, key: str, value: Any) -> None:
    records[keys.METRICS] = MetricRecord({**dict(records.get(keys.METRICS, {}).items()), key: value})


def set_config(records: Records, name: str, **changes: Any) -> None:
    records[name] = ConfigRecord({**dict(records[name].items()), **changes})


# ----------------------------------------------------------------------------------------------------
# Kinds of malformed reply. Factories for the kinds every handler is tried with, then each handler's own.


def kind(registries: list[Kinds], name: str) -> Callable[[Mutation], Mutation]:
    def register(fn: Mutation) -> Mutation:
        for registry in registries:
            registry[name] = fn
        return fn

    return register


def metric_kinds(registries: list[Kinds], table: list[tuple[str, str, st.SearchStrategy[Any], str]]) -> None:
    """One kind per (name, metric key, values, outcome): the reply's metric ``key`` set to a drawn value."""
    for name, key, values, outcome in table:

        def mutate(draw: Draw, r: Records, s: Scheme | None, key: str = key, v: Any = values, o: str = outcome) -> Any:
            set_metric(r, key, draw(v))
            return r, o

        kind(registries, name)(mutate)


def shared_kinds(registries: list[Kinds], records: dict[str, type]) -> None:
    """Error replies, unknown or mistyped records, unknown metric keys and a second reply."""

    @kind(registries, "client error")
    def _error(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
        return Error(code=draw(st.integers(0, 9)), reason=draw(st.text(max_size=400))), REFUSED

    @kind(registries, "unknown record")
    def _unknown_record(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
        name = draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in records))
        r[name] = draw(st.sampled_from([ConfigRecord({"x": 1}), MetricRecord({"x": 1.0}), ArrayRecord()]))
        return r, REFUSED

    @kind(registries, "record missing or of the wrong kind")
    def _wrong_record(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
        name = draw(st.sampled_from(sorted(n for n in records if n in r)))
        if draw(st.booleans()) and name != keys.METRICS:  # a missing metrics record is an empty one
            del r[name]
        else:
            others = [ConfigRecord({keys.NUM_EXAMPLES: 3}), MetricRecord({"x": 1}), ArrayRecord()]
            r[name] = draw(st.sampled_from([o for o in others if not isinstance(o, records[name])]))
        return r, REFUSED

    @kind(registries, "second reply")
    def _second(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
        return [r, Error(code=1, reason="a second answer")], ACCEPTED  # only the first one counts

    if keys.METRICS not in records:
        return

    @kind(registries, "unknown metric keys")
    def _unknown_metrics(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
        for name in draw(st.lists(st.text(max_size=12), min_size=1, max_size=50)):
            set_metric(r, f"unknown-{name}", draw(st.one_of(NON_FINITE, INT64, st.lists(st.floats(), max_size=4))))
        return r, ACCEPTED  # never read, never stored: ignored


# Plain rounds (``compression.uplink = none``) and compressed ones share the metrics' kinds.
PLAIN: Kinds = {}
PACKED_KINDS: Kinds = {}
TRAIN = [PLAIN, PACKED_KINDS]
shared_kinds(TRAIN, {keys.DELTA: ArrayRecord, keys.METRICS: MetricRecord, keys.WIRE: ConfigRecord})
metric_kinds(
    TRAIN,
    [
        ("num-examples invalid", keys.NUM_EXAMPLES, BAD_COUNT, REFUSED),
        ("largest valid num-examples", keys.NUM_EXAMPLES, st.integers(MAX_EXAMPLES - 9, MAX_EXAMPLES), ACCEPTED),
        ("train loss not finite", keys.TRAIN_LOSS, BAD_LOSS, REFUSED),
        ("epsilon invalid", keys.EPSILON, BAD_EPSILON, REFUSED),
        # the site's own statement about its spend: recorded, never aggregated
        ("epsilon infinite or huge", keys.EPSILON, st.one_of(st.just(math.inf), st.floats(1e6, 1.7e308)), ACCEPTED),
        ("lora rank invalid", keys.LORA_RANK, BAD_RANK, REFUSED),
    ],
)


@kind(TRAIN, "no delta record")
def _no_delta(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    del r[keys.DELTA]
    return r, REFUSED


@kind(TRAIN, "site seconds not finite")
def _seconds(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    for key in (keys.TIME_LOAD, keys.TIME_TRAIN, keys.TIME_SERIALIZE):
        set_metric(r, key, draw(st.one_of(NON_FINITE, st.floats(-1e308, -1e-9), st.lists(st.floats(0, 1)))))
    return r, ACCEPTED  # left out of the time breakdown


@kind(TRAIN, "data-check counts malformed")
def _data_checks(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    for name in ("malformed", "empty", "duplicates", "too-long"):
        set_metric(r, keys.DATA_CHECK + name, draw(st.one_of(NON_FINITE, st.integers(-(2**63), -1))))
    return r, ACCEPTED  # left out of the row's data checks


@kind(TRAIN, "budget exhausted")
def _declines(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    set_metric(r, keys.BUDGET_EXHAUSTED, 1)
    set_metric(r, keys.EPSILON, draw(st.floats(0, 50)))
    return r, DECLINED


@kind(TRAIN, "budget exhausted with an invalid epsilon")
def _declines_badly(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    set_metric(r, keys.BUDGET_EXHAUSTED, 1)
    set_metric(r, keys.EPSILON, draw(BAD_EPSILON))
    return r, REFUSED


# ``compression.uplink = none`` sends lossless float32, packed like every other scheme: these kinds
# change the arrays a site packs (their names, shapes, values) or the packed array itself.


def repack(r: Records, arrays: dict[str, np.ndarray], s: Scheme | None) -> None:
    """Replace the reply's delta by ``arrays``, packed as an honest site packs them."""
    assert s is not None
    records, _ = encode(arrays, keys.DELTA, s, rng_for(0, 1, "bad"))
    r.update(records)


@kind([PLAIN], "garbage array bytes")
def _garbage(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    replace_array(r, keys.DELTA, PACKED, garbage_array(draw))
    return r, REFUSED


@kind([PLAIN], "wrong dtype")
def _dtype(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    dtype = draw(st.sampled_from(["<f8", "<f2", "<i4", ">f4", "<c8", "?"]))
    size = sum(math.prod(shape) for shape in SHAPES.values())
    replace_array(r, keys.DELTA, PACKED, Array(np.zeros(size, dtype)))
    return r, REFUSED


@kind([PLAIN], "wrong shape")
def _shape(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    name = draw(st.sampled_from(list(SHAPES)))
    shape = draw(st.lists(st.integers(0, 9), max_size=4).map(tuple).filter(lambda t: t != SHAPES[name]))
    repack(r, {**delta_of(BAD), name: np.zeros(shape, np.float32)}, s)
    return r, REFUSED


def _entries(outcome: str, values: st.SearchStrategy[float]) -> Mutation:
    def mutate(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
        name = draw(st.sampled_from(list(SHAPES)))
        arrays = delta_of(BAD)
        for i in draw(st.lists(st.integers(0, arrays[name].size - 1), min_size=1, max_size=4)):
            arrays[name].reshape(-1)[i] = draw(values)
        repack(r, arrays, s)
        return r, outcome

    return mutate


SIGN = st.sampled_from([-1.0, 1.0])
kind([PLAIN], "non-finite entries")(_entries(REFUSED, NON_FINITE))
kind([PLAIN], "entries whose norm overflows")(
    _entries(REFUSED, st.floats(2e19, 3.4e38).flatmap(lambda v: SIGN.map(v.__mul__)))
)
# without `server.max-update-norm` a large update is not malformed
kind([PLAIN], "huge finite entries")(_entries(ACCEPTED, st.floats(1e3, 1e15)))


@kind([PLAIN], "missing, extra or a thousand adapter keys")
def _keys(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    arrays = delta_of(BAD)
    if draw(st.booleans()):
        del arrays[draw(st.sampled_from(list(SHAPES)))]
    for i in range(draw(st.sampled_from([0, 1, 1000]))):
        arrays[f"extra.{i}"] = np.zeros(1, np.float32)
    if len(arrays) == len(SHAPES):
        arrays["extra"] = np.zeros(1, np.float32)
    repack(r, arrays, s)
    return r, REFUSED


@kind([PLAIN], "compressed reply in a plain round")
def _compressed(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    set_config(r, keys.WIRE, scheme="int8")
    return r, REFUSED


@kind([PLAIN], "per-key float32 arrays (the retired format)")
def _per_key(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    r[keys.DELTA] = record_from_arrays(delta_of(BAD))
    if draw(st.booleans()):
        del r[keys.WIRE]
    return r, REFUSED


# Packed deltas (every ``compression.uplink``): one uint8 array and its index.


def packed_bytes(r: Records) -> np.ndarray:
    """The packed payload, as a writable copy."""
    buf = io.BytesIO(r[keys.DELTA][PACKED].data)
    np.lib.format.read_magic(buf)
    np.lib.format.read_array_header_1_0(buf)
    return np.frombuffer(buf.read(), np.uint8).copy()


def set_packed(r: Records, packed: np.ndarray) -> None:
    r[keys.DELTA] = ArrayRecord(OrderedDict([(PACKED, Array(packed))]))


def sections(s: Scheme) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(start, stop) of each array's head and of each array's tail in the packed bytes."""
    sizes = [s.sizes(shape) for shape in SHAPES.values()]
    heads, tails, at = [], [], 0
    for part in (0, 1):
        for size in sizes:
            (heads, tails)[part].append((at, at + size[part]))
            at += size[part]
    return heads, tails


@kind([PACKED_KINDS], "no index")
def _no_index(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    del r[keys.WIRE]
    return r, REFUSED


@kind([PACKED_KINDS], "float arrays instead of packed")
def _unpacked(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    r[keys.DELTA] = record_from_arrays(delta_of(BAD))
    return r, REFUSED


@kind([PACKED_KINDS], "index of another scheme")
def _scheme(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    field = draw(st.sampled_from(["scheme", "block", "fraction"]))
    values = {
        "scheme": st.sampled_from(["int8", "int4", "topk", "float32", "x"]),
        "block": INT64,
        "fraction": st.floats(),
    }
    set_config(r, keys.WIRE, **{field: draw(values[field].filter(lambda v: v != r[keys.WIRE][field]))})
    return r, REFUSED


@kind([PACKED_KINDS], "index names wrong")
def _names(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    names = list(r[keys.WIRE]["names"])
    how = draw(st.sampled_from(["duplicate", "unknown", "bytes", "swapped", "missing"]))
    if how == "duplicate":
        names[1] = names[0]
    elif how == "unknown":
        names[0] = draw(st.text(max_size=30).filter(lambda n: n not in SHAPES))
    elif how == "bytes":
        names = [n.encode() for n in names]
    elif how == "swapped":  # the shapes no longer match their names
        names.reverse()
    else:
        names = names[:1]
    set_config(r, keys.WIRE, names=names)
    return r, REFUSED


@kind([PACKED_KINDS], "index dims malformed")
def _dims(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    field = draw(st.sampled_from(["ndims", "dims"]))
    lists = [st.lists(x, min_size=1, max_size=6) for x in (st.text(max_size=3), st.floats(), st.booleans(), INT64)]
    values = draw(st.one_of(*lists, INT64).filter(lambda v: v != r[keys.WIRE][field]))
    set_config(r, keys.WIRE, **{field: values})
    return r, REFUSED


@kind([PACKED_KINDS], "packed garbage bytes")
def _packed_garbage(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    replace_array(r, keys.DELTA, PACKED, garbage_array(draw))
    return r, REFUSED


@kind([PACKED_KINDS], "packed wrong length")
def _length(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    packed = packed_bytes(r)
    set_packed(r, np.resize(packed, draw(st.integers(0, 3 * packed.size).filter(lambda n: n != packed.size))))
    return r, REFUSED


@kind([PACKED_KINDS], "packed not flat uint8")
def _not_uint8(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    packed = packed_bytes(r)
    how = draw(st.sampled_from(["<f4", "<i2", "2-D"]))
    set_packed(r, packed.reshape(1, -1) if how == "2-D" else packed[: packed.size // 4 * 4].view(how))
    return r, REFUSED


@kind([PACKED_KINDS], "two arrays in the record")
def _two_arrays(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    arrays = OrderedDict(r[keys.DELTA].items())
    arrays[draw(st.text(min_size=1, max_size=8).filter(lambda n: n != PACKED))] = Array(np.zeros(2, np.uint8))
    r[keys.DELTA] = ArrayRecord(arrays)
    return r, REFUSED


@kind([PACKED_KINDS], "non-finite scales or values")
def _non_finite(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    assert s is not None
    packed = packed_bytes(r)
    start, stop = draw(st.sampled_from(sections(s)[0]))
    at = start + 4 * draw(st.integers(0, (stop - start) // 4 - 1))
    packed[at : at + 4] = np.frombuffer(np.float32(draw(NON_FINITE)).tobytes(), np.uint8)
    set_packed(r, packed)
    return r, REFUSED


@kind([PACKED_KINDS], "negative scale, code below -L or bad top-k index")
def _out_of_range(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    assert s is not None
    packed = packed_bytes(r)
    (h0, _), (t0, t1) = sections(s)[0][0], sections(s)[1][0]
    if s.name == "float32":  # no scales or codes: any finite value is valid, so make the index disagree
        set_config(r, keys.WIRE, dims=[d + 1 for d in r[keys.WIRE]["dims"]])
        return r, REFUSED
    if s.name == "topk":
        idx = packed[t0:t1].view("<i4").copy()
        how = draw(st.sampled_from(["too large", "negative", "repeated", "reversed"]))
        if how == "too large":
            idx[-1] = draw(st.integers(math.prod(SHAPES["m.lora_A.weight"]), 2**31 - 1))
        elif how == "negative":
            idx[0] = draw(st.integers(-(2**31), -1))
        else:
            idx[:] = idx[0] if how == "repeated" else idx[::-1].copy()
        packed[t0:t1] = np.frombuffer(idx.tobytes(), np.uint8)
    elif draw(st.booleans()):
        packed[h0 : h0 + 4] = np.frombuffer(np.float32(-draw(st.floats(1e-30, 1e30))).tobytes(), np.uint8)
    elif s.name == "int16":
        packed[t0 : t0 + 2] = np.frombuffer(np.int16(-32768).tobytes(), np.uint8)
    elif s.name == "int8":
        packed[t0] = 0x80  # -128
    else:
        packed[t0] &= 0x0F  # a high nibble of 0 is code -8
    set_packed(r, packed)
    return r, REFUSED


@kind([PACKED_KINDS], "flipped bytes")
def _flipped(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    packed = packed_bytes(r)
    for at in draw(st.lists(st.integers(0, packed.size - 1), min_size=1, max_size=6)):
        packed[at] ^= draw(st.integers(1, 255))
    set_packed(r, packed)
    return r, EITHER  # it may still be a valid encoding of other values


# ----------------------------------------------------------------------------------------------------
# The plain and compressed rounds.


def train_config(uplink: str) -> RunConfig:
    flat_cfg = {
        "server.min-clients": 2,
        "eval.federated": True,
        "compression.block-size": 4,
        "compression.topk-fraction": 0.25,
    }
    return Plan.from_flat({**flat_cfg, "compression.uplink": uplink}).for_round(1)


def honest_records(node: int, scheme: Scheme | None) -> Records:
    records, _ = encode(delta_of(node), keys.DELTA, scheme, rng_for(0, 1, f"site {node}"))
    metrics = {keys.NUM_EXAMPLES: EXAMPLES[node], keys.TRAIN_LOSS: 0.5 + node, keys.LORA_RANK: RANK}
    return {**records, keys.METRICS: MetricRecord(metrics)}


def fresh_state() -> ServerState:
    return ServerState(round=0, global_arrays=dict(GLOBAL), rng=np.random.default_rng(0), run_id="fuzz")


def run_train_case(uplink: str, mutation: Mutation, draw: Draw) -> None:
    # Prepare: node BAD answers with a mutated copy of an honest reply (drawn while the round runs)
    cfg = train_config(uplink)
    scheme = Scheme.of(cfg.compression, "uplink")
    state, record, sent = fresh_state(), RoundRecord(round=1), {}

    def answer(msg: Message) -> list[Message]:
        node = msg.metadata.dst_node_id
        if node != BAD:
            return as_replies(msg, honest_records(node, scheme))
        sent["reply"], sent["outcome"] = mutation(draw, honest_records(BAD, scheme), scheme)
        records = first_records(sent["reply"])
        if records is not None:  # what the server sees, read before it releases the arrays
            sent["weight"] = records.get(keys.METRICS, {}).get(keys.NUM_EXAMPLES)
            try:
                sent["delta"] = decode(RecordDict(dict(records)), keys.DELTA, scheme, SHAPES)
            except Exception:
                sent["delta"] = None
        return as_replies(msg, sent["reply"])

    # Execute
    plain_round.train_round(cfg, Grid(answer), state, 1, list(NODES), record, {}, float(len(NODES)))
    row = record.to_json()

    # Assert: the bad node's fate
    outcome, replied = sent["outcome"], row["replied_nodes"]
    failures = {f["node"]: f["reason"] for f in row["failures"]}
    assert set(failures) <= {BAD}, failures  # an honest node is never blamed
    if outcome == REFUSED:
        assert BAD in failures, f"{uplink}: the malformed reply was accepted"
        assert_failure(failures, BAD)
    elif outcome == ACCEPTED:
        assert BAD not in failures and BAD in replied, failures
    elif outcome == DECLINED:
        assert row["budget_exhausted_nodes"] == state.privacy.exhausted == [BAD] and BAD not in failures
    else:
        assert (BAD in failures) != (BAD in replied)
    # Assert: the aggregate is the example-weighted mean of what was accepted, and finite
    deltas = {n: decode(RecordDict(honest_records(n, scheme)), keys.DELTA, scheme, SHAPES) for n in GOOD}
    weights = {n: EXAMPLES[n] for n in GOOD}
    if BAD in replied:
        deltas[BAD], weights[BAD] = sent["delta"], sent["weight"]
    assert sorted(replied) == sorted(deltas) and row["updated"]
    for key, value in GLOBAL.items():
        mean = sum(weights[n] * deltas[n][key].astype(np.float64) for n in deltas) / sum(weights.values())
        np.testing.assert_allclose(state.global_arrays[key], value + mean, rtol=1e-5, atol=1e-7)
        assert np.isfinite(state.global_arrays[key]).all()
    assert all(math.isfinite(v) for v in row["time"].values())
    assert row["train_loss"] is not None and math.isfinite(row["train_loss"])
    assert not math.isnan(state.privacy.site_epsilon.get(BAD, 0.0))


@pytest.mark.parametrize("name", sorted(PLAIN))
@FUZZ
@given(data=st.data())
def test_plain_round_survives(name: str, data: st.DataObject) -> None:
    run_train_case("none", PLAIN[name], data.draw)


@pytest.mark.parametrize("uplink", SCHEMES)
@pytest.mark.parametrize("name", sorted(PACKED_KINDS))
@settings(FUZZ, max_examples=2)
@given(data=st.data())
def test_compressed_round_survives(uplink: str, name: str, data: st.DataObject) -> None:
    run_train_case(uplink, PACKED_KINDS[name], data.draw)


# ----------------------------------------------------------------------------------------------------
# Federated evaluation replies.

EVAL: Kinds = {}
shared_kinds([EVAL], {keys.METRICS: MetricRecord})
metric_kinds(
    [EVAL],
    [
        ("num-examples invalid", keys.NUM_EXAMPLES, BAD_COUNT, REFUSED),
        ("eval loss invalid", keys.EVAL_LOSS, st.one_of(BAD_LOSS, st.floats(max_value=-1e-300)), REFUSED),
        ("num-generated invalid", keys.NUM_GENERATED, BAD_COUNT, REFUSED),
        (
            "task metric outside [0, 1]",
            ROUGE_L,
            st.one_of(NON_FINITE, st.floats(1.0000001, 1e308), st.floats(-1e308, -1e-9), st.lists(st.floats(0, 1))),
            REFUSED,
        ),
    ],
)


@kind([EVAL], "no metrics")
def _no_metrics(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    return {}, REFUSED


@kind([EVAL], "huge but finite loss")
def _huge_loss(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    set_metric(r, keys.EVAL_LOSS, draw(st.floats(1e30, 1.7976931348623157e308)))
    set_metric(r, keys.NUM_EXAMPLES, MAX_EXAMPLES)
    return r, ACCEPTED  # the federation's mean is a convex combination, so it stays finite


def eval_records(node: int) -> Records:
    metrics = {keys.EVAL_LOSS: 1 / node, keys.NUM_EXAMPLES: EXAMPLES[node], keys.NUM_GENERATED: 2, ROUGE_L: node / 10}
    return {keys.METRICS: MetricRecord(metrics)}


@pytest.mark.parametrize("name", sorted(EVAL))
@FUZZ
@given(data=st.data())
def test_federated_evaluation_survives(name: str, data: st.DataObject) -> None:
    # Prepare
    sent: dict[str, Any] = {}

    def answer(msg: Message) -> list[Message]:
        node = msg.metadata.dst_node_id
        if node != BAD:
            return as_replies(msg, eval_records(node))
        sent["reply"], sent["outcome"] = EVAL[name](data.draw, eval_records(BAD), None)
        return as_replies(msg, sent["reply"])

    record = RoundRecord(round=1)

    # Execute
    combined = eval_round.federated_eval(train_config("none"), Grid(answer), fresh_state(), 1, record)
    row = record.to_json()

    # Assert
    failures = {f["node"]: f["reason"] for f in row.get("eval_failures", [])}
    if sent["outcome"] == REFUSED:
        assert list(failures) == [BAD] and str(BAD) not in row["sites_eval"]
        assert_failure(failures, BAD)
    else:
        assert not failures and str(BAD) in row["sites_eval"]
    used = {n: eval_records(n)[keys.METRICS] for n in GOOD}
    if not failures:
        used[BAD] = first_records(sent["reply"])[keys.METRICS]  # type: ignore[index]
    assert sorted(int(n) for n in row["sites_eval"]) == sorted(used)
    loss = np.array([used[n][keys.EVAL_LOSS] for n in used], np.float64)
    weight = np.array([used[n][keys.NUM_EXAMPLES] for n in used], np.float64)
    assert combined["loss"] == pytest.approx(min(np.sum(loss * (weight / weight.sum())), loss.max()), rel=1e-9)
    rouge = [(used[n][ROUGE_L], used[n][keys.NUM_GENERATED]) for n in used]
    assert combined[ROUGE_L] == pytest.approx(sum(v * w for v, w in rouge) / sum(w for _, w in rouge), rel=1e-9)
    assert all(math.isfinite(v) for v in combined.values())


# ----------------------------------------------------------------------------------------------------
# SecAgg+: honest sites run the package's stage functions (as test_secagg_protocol.py does); node BAD
# answers one stage with a malformed reply.

STAGES = {
    "keys": f"{MessageType.QUERY}.{keys.SECAGG_KEYS}",
    "shares": f"{MessageType.QUERY}.{keys.SECAGG_SHARE}",
    "masked": f"{MessageType.TRAIN}.{keys.SECAGG_TRAIN}",
    "unmask": f"{MessageType.QUERY}.{keys.SECAGG_UNMASK}",
}
STAGE_RECORDS: dict[str, dict[str, type]] = {
    "keys": {keys.SECAGG: ConfigRecord, keys.METRICS: MetricRecord},
    "shares": {keys.SECAGG: ConfigRecord},
    "masked": {keys.MASKED: ArrayRecord, keys.METRICS: MetricRecord},
    "unmask": {keys.SECAGG: ConfigRecord},
}
SECAGG: dict[str, Kinds] = {stage: {} for stage in STAGES}
for _stage, _records in STAGE_RECORDS.items():
    shared_kinds([SECAGG[_stage]], _records)


class Sites:
    """Honest SecAgg+ clients; ``corrupt`` rewrites node BAD's answer to ``stage``."""

    def __init__(self, stage: str, corrupt: Callable[[Records], Reply]) -> None:
        self.kind, self.corrupt = STAGES[stage], corrupt
        self.keys: dict[int, stages.ClientKeys] = {}
        self.peers: dict[int, dict[int, stages.PublicKeys]] = {}
        self.seed: dict[int, bytes] = {}
        self.held: dict[int, dict[int, stages.HeldShares]] = {}
        self.threshold: dict[int, int] = {}
        self.alpha: dict[int, float] = {}

    def __call__(self, msg: Message) -> list[Message]:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        try:
            records = self.honest(node, kind, msg.content.config_records, msg)
        except (FedtuneError, KeyError, ValueError) as exc:  # what a real site refuses a stage with
            return [Message(Error(code=1, reason=str(exc)), reply_to=msg)]
        return as_replies(msg, self.corrupt(records) if node == BAD and kind == self.kind else records)

    def honest(self, node: int, kind: str, config: Any, msg: Message) -> Records:
        record, rnd = config[keys.SECAGG], int(config[keys.SECAGG][keys.ROUND])
        if kind == STAGES["keys"]:
            self.keys[node] = stages.advertise_keys()
            public = self.keys[node].public()
            return {
                keys.SECAGG: ConfigRecord({keys.SA_ENC_KEY: public.encryption, keys.SA_MASK_KEY: public.mask}),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: EXAMPLES[node], keys.LORA_RANK: RANK}),
            }
        if kind == STAGES["shares"]:
            ids, enc, msk = record[keys.SA_IDS], record[keys.SA_ENC_KEY], record[keys.SA_MASK_KEY]
            self.peers[node] = {i: stages.PublicKeys(e, m) for i, e, m in zip(ids, enc, msk, strict=True)}
            self.threshold[node] = int(record[keys.SA_THRESHOLD])
            seed, own, out = stages.share_keys(node, self.keys[node], self.peers[node], self.threshold[node], rnd)
            self.seed[node], self.held[node] = seed, {node: own}
            order = sorted(out)
            return {keys.SECAGG: ConfigRecord({keys.SA_IDS: order, keys.SA_CIPHERTEXTS: [out[i] for i in order]})}
        if kind == STAGES["masked"]:
            blobs = dict(zip(record[keys.SA_IDS], record[keys.SA_CIPHERTEXTS], strict=True))
            received = stages.receive_shares(node, self.keys[node], self.peers[node], blobs, rnd)
            self.held[node] |= received
            self.alpha[node] = float(record[keys.SA_ALPHA])
            quantizer = Quantizer(clip=float(record[keys.SA_CLIP]), bits=int(record[keys.SA_QUANT_BITS]))
            dither = np.random.default_rng(node)
            vector = quantizer.quantize(flat.flatten(delta_of(node), GLOBAL) * self.alpha[node], dither)
            bits = int(record[keys.SA_MODULUS_BITS])
            context = round_context(rnd, str(config[keys.SPEC][keys.RUN_ID]).encode())
            peers = {j: self.peers[node][j] for j in received}
            masked = stages.masked_input(node, vector, self.seed[node], self.keys[node], peers, bits, rnd, context)
            array = ArrayRecord(OrderedDict([(keys.MASKED, Array(masked.astype(wire_dtype(bits))))]))
            return {keys.MASKED: array, keys.METRICS: MetricRecord({})}
        survivors, dropped = list(record[keys.SA_SURVIVORS]), list(record[keys.SA_DROPPED])
        seeds, key_shares = stages.unmask_reply(node, self.held[node], survivors, dropped, self.threshold[node])
        return {
            keys.SECAGG: ConfigRecord(
                {
                    keys.SA_SEED_OWNERS: sorted(seeds),
                    keys.SA_SEED_SHARES: [seeds[i] for i in sorted(seeds)],
                    keys.SA_KEY_OWNERS: sorted(key_shares),
                    keys.SA_KEY_SHARES: [key_shares[i] for i in sorted(key_shares)],
                }
            )
        }


def _ids_and_values(ids_key: str, values_key: str, how: str | None = None) -> Mutation:
    """Owner ids that are not distinct integers, name an unasked node, or do not match their values."""

    def mutate(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
        ids, values = list(r[keys.SECAGG][ids_key]) or [GOOD[0]], list(r[keys.SECAGG][values_key]) or [b"x" * 44]
        way = how or draw(
            st.sampled_from(["float", "text", "bool", "duplicate", "huge", "unknown", "fewer", "lengths"])
        )
        if way == "inf":  # a ConfigRecord takes [inf, 2.0, ...]; int(inf) raised OverflowError out of loop.run
            ids = [float(i) for i in ids]
            ids[draw(st.integers(0, len(ids) - 1))] = draw(st.sampled_from([math.inf, -math.inf]))
        elif way in ("float", "text", "bool"):
            ids = [{"float": float, "text": str, "bool": lambda _: True}[way](i) for i in ids]
        elif way == "duplicate":
            ids, values = ids + ids, values + values
        elif way in ("huge", "unknown"):
            ids, values = [*ids, 2**63 - 1 if way == "huge" else draw(st.integers(100, 2**62))], [*values, values[0]]
        elif way == "fewer" and len(ids) > 1:
            ids, values = ids[1:], values[1:]
        else:
            values = [*values, b"x"]
        set_config(r, keys.SECAGG, **{ids_key: ids, values_key: values})
        return r, REFUSED

    return mutate


kind([SECAGG["shares"]], "neighbour ids not finite")(_ids_and_values(keys.SA_IDS, keys.SA_CIPHERTEXTS, "inf"))
kind([SECAGG["shares"]], "neighbour ids malformed")(_ids_and_values(keys.SA_IDS, keys.SA_CIPHERTEXTS))
kind([SECAGG["unmask"]], "seed owners not finite")(_ids_and_values(keys.SA_SEED_OWNERS, keys.SA_SEED_SHARES, "inf"))
kind([SECAGG["unmask"]], "seed owners malformed")(_ids_and_values(keys.SA_SEED_OWNERS, keys.SA_SEED_SHARES))
kind([SECAGG["unmask"]], "key owners malformed")(_ids_and_values(keys.SA_KEY_OWNERS, keys.SA_KEY_SHARES))
metric_kinds(
    [SECAGG["keys"]],
    [
        ("num-examples invalid", keys.NUM_EXAMPLES, BAD_COUNT, REFUSED),
        ("largest valid num-examples", keys.NUM_EXAMPLES, st.just(MAX_EXAMPLES), ACCEPTED),
        ("lora rank invalid", keys.LORA_RANK, BAD_RANK, REFUSED),
    ],
)
metric_kinds([SECAGG["masked"]], [("epsilon invalid", keys.EPSILON, BAD_EPSILON, REFUSED)])


@kind([SECAGG["keys"]], "public keys malformed")
def _public_keys(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    field = draw(st.sampled_from([keys.SA_ENC_KEY, keys.SA_MASK_KEY]))
    wrong = st.one_of(st.binary().filter(lambda b: len(b) != 32), INT64, st.text(), st.lists(st.binary(), max_size=3))
    set_config(r, keys.SECAGG, **{field: draw(wrong)})
    return r, REFUSED


@kind([SECAGG["keys"]], "public key random bytes")
def _random_key(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    set_config(r, keys.SECAGG, **{keys.SA_ENC_KEY: draw(st.binary(min_size=32, max_size=32))})
    return r, EITHER  # random bytes are an X25519 key; a low-order one makes the honest sites refuse the round


@kind([SECAGG[stage] for stage in STAGE_RECORDS if keys.SECAGG in STAGE_RECORDS[stage]], "unknown keys in the record")
def _unknown_entries(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    extra = {f"x-{i}": draw(st.one_of(INT64, st.binary(max_size=9))) for i in range(draw(st.integers(1, 9)))}
    set_config(r, keys.SECAGG, **extra)
    return r, ACCEPTED


@kind([SECAGG["shares"]], "ciphertexts not bytes")
def _ciphertext_types(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    n = len(r[keys.SECAGG][keys.SA_IDS])
    set_config(
        r,
        keys.SECAGG,
        **{keys.SA_CIPHERTEXTS: draw(st.one_of(*(st.lists(x, min_size=n, max_size=n) for x in (INT64, st.text()))))},
    )
    return r, REFUSED


@kind([SECAGG["shares"]], "ciphertexts garbage")
def _ciphertexts(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    n = len(r[keys.SECAGG][keys.SA_IDS])
    set_config(r, keys.SECAGG, **{keys.SA_CIPHERTEXTS: draw(st.lists(GARBAGE, min_size=n, max_size=n))})
    return r, EITHER  # relayed as they are: the honest recipients cannot open them and refuse the round


@kind([SECAGG["masked"]], "masked array malformed")
def _masked(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    good = r[keys.MASKED][keys.MASKED]
    vector = np.load(io.BytesIO(good.data))
    how = draw(st.sampled_from(["garbage", "dtype", "length", "2-D", "two arrays"]))
    if how == "two arrays":
        r[keys.MASKED] = ArrayRecord(OrderedDict([(keys.MASKED, good), ("other", Array(vector))]))
        return r, REFUSED
    if how == "garbage":
        array = garbage_array(draw)
    elif how == "dtype":
        array = Array(
            vector.astype(draw(st.sampled_from(["<f4", "<u8", "<i4", "u1" if vector.itemsize > 1 else "<u2"])))
        )
    elif how == "length":
        array = Array(np.resize(vector, draw(st.integers(0, 3 * vector.size).filter(lambda n: n != vector.size))))
    else:
        array = Array(vector.reshape(1, -1))
    r[keys.MASKED] = ArrayRecord(OrderedDict([(keys.MASKED, array)]))
    return r, REFUSED


@kind([SECAGG["masked"]], "budget exhausted")
def _exhausted(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    return {keys.METRICS: MetricRecord({keys.BUDGET_EXHAUSTED: 1, keys.EPSILON: draw(st.floats(0, 9))})}, DECLINED


@kind([SECAGG["unmask"]], "shares malformed")
def _shares(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    n = len(r[keys.SECAGG][keys.SA_SEED_OWNERS])
    wrong = st.one_of(
        *(st.lists(x, min_size=n, max_size=n) for x in (st.binary().filter(lambda b: len(b) != 44), INT64))
    )
    set_config(r, keys.SECAGG, **{keys.SA_SEED_SHARES: draw(wrong)})
    return r, REFUSED


@kind([SECAGG["unmask"]], "shares garbage")
def _share_bytes(draw: Draw, r: Records, s: Scheme | None) -> tuple[Reply, str]:
    n = len(r[keys.SECAGG][keys.SA_SEED_OWNERS])
    set_config(
        r,
        keys.SECAGG,
        **{keys.SA_SEED_SHARES: draw(st.lists(st.binary(min_size=44, max_size=44), min_size=n, max_size=n))},
    )
    return r, ABANDONED  # well formed: only the commitment of the rebuilt secret can tell, and it does


def secagg_config() -> RunConfig:
    flat_cfg = {"secagg.protocol": "secagg", "secagg.clip": 0.05, "server.min-clients": 2, "eval.federated": False}
    return Plan.from_flat(flat_cfg).for_round(1)


@pytest.mark.parametrize(("stage", "name"), sorted((stage, name) for stage in SECAGG for name in SECAGG[stage]))
@settings(FUZZ, max_examples=2)
@given(data=st.data())
def test_secagg_stage_survives(stage: str, name: str, data: st.DataObject) -> None:
    # Prepare
    sent: dict[str, str] = {}

    def corrupt(records: Records) -> Reply:
        reply, sent["outcome"] = SECAGG[stage][name](data.draw, records, None)
        return reply

    sites, state, record = Sites(stage, corrupt), fresh_state(), RoundRecord(round=1)

    # Execute
    secagg_round(secagg_config(), Grid(sites), state, 1, list(NODES), record, {}, float(len(NODES)))
    row = record.to_json()

    # Assert: an abandoned round releases nothing
    outcome, info, survivors = sent["outcome"], row["secagg"], row["replied_nodes"]
    failures = {f["node"]: f["reason"] for f in row["failures"]}
    assert all(np.isfinite(v).all() for v in state.global_arrays.values())
    if outcome == ABANDONED or (outcome == EITHER and not row["updated"]):
        assert not row["updated"] and info["abandoned"]
        for key, value in GLOBAL.items():
            np.testing.assert_array_equal(state.global_arrays[key], value)
        return
    # Assert: else the bad node's fate, and the sum of the survivors' inputs within one step each
    assert row["updated"], info.get("abandoned")
    assert set(failures) <= {BAD}, failures
    if outcome == REFUSED:
        assert_failure(failures, BAD)
        assert (BAD in survivors) == (stage == "unmask")  # its masked input is in the sum once sent
    elif outcome == ACCEPTED:
        assert BAD not in failures and BAD in survivors
    elif outcome == DECLINED:
        assert BAD not in failures and BAD not in survivors and row["budget_exhausted_nodes"] == [BAD]
    alpha = {n: sites.alpha[n] for n in survivors}
    step = 2 * info["clip"] / (2 ** info["quant_bits"] - 1)
    tolerance = len(survivors) * step / sum(alpha.values()) + 1e-7
    for key, value in GLOBAL.items():
        mean = sum(alpha[n] * delta_of(n)[key].astype(np.float64) for n in survivors) / sum(alpha.values())
        np.testing.assert_allclose(state.global_arrays[key], value + mean, rtol=0, atol=tolerance)


# ----------------------------------------------------------------------------------------------------
# The two crashes the review found, one line each in the log; and unmasking, which has no one culprit.


def test_a_corrupt_array_fails_its_node_alone_and_the_plain_round_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: BAD's delta holds bytes that are no npy array (numpy raised ValueError out of the round)
    scheme = Scheme.of(train_config("none").compression, "uplink")  # lossless float32, packed

    def answer(msg: Message) -> list[Message]:
        node = msg.metadata.dst_node_id
        records = honest_records(node, scheme)
        if node == BAD:
            corrupt = Array(dtype="uint8", shape=(80,), stype=NUMPY, data=b"\x93NUMPY\x01garbage")
            replace_array(records, keys.DELTA, PACKED, corrupt)
        return as_replies(msg, records)

    state, record = fresh_state(), RoundRecord(round=1)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        plain_round.train_round(train_config("none"), Grid(answer), state, 1, list(NODES), record, {}, 5.0)
    row = record.to_json()

    # Assert
    reason = f"array {PACKED!r} is not an npy array"
    assert row["failures"] == [{"node": BAD, "reason": reason}]
    assert row["replied_nodes"] == list(GOOD) and row["updated"]
    assert [r.getMessage() for r in caplog.records] == [f"round 1: rejected reply from node {BAD}: {reason}"]


def test_an_infinite_node_id_fails_its_node_alone_and_the_secagg_round_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: BAD's share-stage reply names a neighbour inf (int(inf): OverflowError escaped to loop.run)
    def corrupt(records: Records) -> Reply:
        ids = [math.inf, *(float(i) for i in records[keys.SECAGG][keys.SA_IDS][1:])]
        set_config(records, keys.SECAGG, **{keys.SA_IDS: ids})
        return records

    state, record = fresh_state(), RoundRecord(round=1)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        secagg_round(secagg_config(), Grid(Sites("shares", corrupt)), state, 1, list(NODES), record, {}, 5.0)
    row = record.to_json()

    # Assert
    reason = f"'{keys.SA_IDS}' must be distinct integer node ids"
    assert row["failures"] == [{"node": BAD, "reason": f"secagg shares: {reason}"}]
    assert row["updated"] and row["replied_nodes"] == list(GOOD)
    assert [r.getMessage() for r in caplog.records] == [f"round 1: secagg stage shares: node {BAD} failed: {reason}"]


def test_an_unexpected_exception_is_one_warning_line_with_its_type_and_the_traceback_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: BAD's key-stage record lacks its encryption key (a KeyError in the handler)
    def corrupt(records: Records) -> Reply:
        records[keys.SECAGG] = ConfigRecord({keys.SA_MASK_KEY: records[keys.SECAGG][keys.SA_MASK_KEY]})
        return records

    state, record = fresh_state(), RoundRecord(round=1)

    # Execute
    with caplog.at_level(logging.DEBUG, logger="fedtune"):
        secagg_round(secagg_config(), Grid(Sites("keys", corrupt)), state, 1, list(NODES), record, {}, 5.0)
    row = record.to_json()

    # Assert
    reason = f"malformed reply (KeyError: '{keys.SA_ENC_KEY}')"
    assert row["failures"] == [{"node": BAD, "reason": f"secagg keys: {reason}"}] and row["updated"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [f"round 1: secagg stage keys: node {BAD} failed: {reason}"]
    assert warnings[0].exc_info is None
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


def test_whatever_unmasking_the_shares_raises_abandons_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: unmasking combines many sites' shares and keys, so a failure there has no single culprit;
    # e.g. two colluding sites can make the server rebuild a dropped neighbour's pair mask with a
    # low-order X25519 key, where `cryptography` raises ValueError
    def unmask_sum(*args: Any, **kwargs: Any) -> np.ndarray:
        raise ValueError("Error computing shared key.")

    monkeypatch.setattr(stages, "unmask_sum", unmask_sum)
    state, record = fresh_state(), RoundRecord(round=1)

    # Execute
    secagg_round(secagg_config(), Grid(Sites("keys", lambda r: r)), state, 1, list(NODES), record, {}, 5.0)
    row = record.to_json()

    # Assert
    assert not row["updated"]
    assert row["secagg"]["abandoned"] == "unmasking failed: malformed reply (ValueError: Error computing shared key.)"
    for key, value in GLOBAL.items():
        np.testing.assert_array_equal(state.global_arrays[key], value)
