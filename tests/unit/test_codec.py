"""The packed wire format against plain numpy: exact sizes, lossless framing, strict refusal of
malformed messages, and top-k error feedback through a site's ``context.state``."""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedtune.client.compress import encode_update
from fedtune.config import CompressionConfig, RunConfig
from fedtune.core.errors import UpdateRejected
from fedtune.wire import keys
from fedtune.wire.codec import PACKED, Scheme, rng_for
from fedtune.wire.compression import dequantize, quantize
from fedtune.wire.records import decode, encode, encoded_bytes, message_bytes, read_arrays, record_from_arrays

SHAPES = {"a.lora_A.weight": (4, 33), "a.lora_B.weight": (17, 4), "b.lora_A.weight": (3,)}
SCHEMES = [
    Scheme("float32", 16, 0.1),
    Scheme("int16", 16, 0.1),
    Scheme("int8", 16, 0.1),
    Scheme("int4", 16, 0.1),
    Scheme("topk", 16, 0.25),
]


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * 1e-2).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_packed_update_decodes_to_the_reference_and_its_size_is_known_in_advance(scheme: Scheme) -> None:
    # Prepare
    arrays = _arrays()

    # Execute
    records, _ = encode(arrays, keys.DELTA, scheme, rng_for(0, 1, "site 0"))
    content = RecordDict(records)
    back = decode(content, keys.DELTA, scheme, SHAPES)

    # Assert: one array on the wire; its size is what the projection says
    assert list(content.array_records[keys.DELTA]) == [PACKED]
    assert message_bytes(content, keys.DELTA) == encoded_bytes(SHAPES, scheme)
    assert list(back) == list(SHAPES)
    rng = rng_for(0, 1, "site 0")  # the same dither, drawn in the same order
    for key, value in arrays.items():
        if scheme.name == "float32":
            np.testing.assert_array_equal(back[key], value)
        elif scheme.name == "topk":
            k = math.ceil(scheme.fraction * value.size)
            kept = np.argsort(-np.abs(value.ravel()))[:k]
            want = np.zeros(value.size, np.float32)
            want[kept] = value.ravel()[kept]
            np.testing.assert_array_equal(back[key].ravel(), want)
        else:
            bits = int(scheme.name[3:])
            codes, scales = quantize(value, bits, scheme.block, rng)
            np.testing.assert_array_equal(back[key], dequantize(codes, scales, bits, scheme.block, value.shape))


def test_the_default_is_lossless_packed_float32_and_its_size_matches_flower_records() -> None:
    # Prepare: `compression.* = none`
    arrays = _arrays()
    scheme = Scheme.of(CompressionConfig(), "uplink")

    # Execute
    records, _ = encode(arrays, keys.DELTA, scheme, rng_for(0, 1, "x"))
    back = decode(RecordDict(records), keys.DELTA, scheme, SHAPES)

    # Assert: one packed array of 4 bytes a value (numpy's own npy writer for its size), bit-exact back
    assert scheme.name == "float32" and list(records[keys.DELTA]) == [PACKED]  # type: ignore[arg-type]
    values = sum(math.prod(s) for s in SHAPES.values())
    assert len(records[keys.DELTA][PACKED].data) == len(_npy(np.zeros(4 * values, np.uint8)))  # type: ignore[index]
    assert message_bytes(RecordDict(records), keys.DELTA) == encoded_bytes(SHAPES, scheme)
    for key, value in arrays.items():
        assert back[key].dtype == np.float32 and back[key].tobytes() == value.tobytes()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _tampered(scheme: Scheme, change: Callable[[np.ndarray, dict[str, object]], np.ndarray]) -> RecordDict:
    records, _ = encode(_arrays(), keys.DELTA, scheme, rng_for(0, 1, "x"))
    content = RecordDict(records)
    packed = content.array_records[keys.DELTA][PACKED].numpy().copy()
    index = dict(content.config_records[keys.WIRE])
    packed = change(packed, index)
    return RecordDict(
        {keys.DELTA: ArrayRecord(OrderedDict([(PACKED, Array(packed))])), keys.WIRE: ConfigRecord(index)}  # type: ignore[arg-type]
    )


def _nan_scale(p: np.ndarray, _: dict[str, object]) -> np.ndarray:
    p[:4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    return p


def _index_out_of_range(p: np.ndarray, _: dict[str, object]) -> np.ndarray:
    k = math.ceil(0.25 * 4 * 33)
    start = 4 * sum(math.ceil(0.25 * math.prod(s)) for s in SHAPES.values())  # the indices follow the values
    p[start + 4 * (k - 1) : start + 4 * k] = np.frombuffer(np.int32(10**6).tobytes(), np.uint8)
    return p


def _bad_code(p: np.ndarray, _: dict[str, object]) -> np.ndarray:
    scales = 4 * sum(-(-math.prod(s) // 16) for s in SHAPES.values())
    p[scales] = 0x80  # int8 code -128 is outside -127..127
    return p


def _shape(p: np.ndarray, index: dict[str, object]) -> np.ndarray:
    index["dims"] = [5, 33, 17, 4, 3]
    return p


@pytest.mark.parametrize(
    ("scheme", "change", "match"),
    [
        (SCHEMES[2], lambda p, _: p.view(np.int8), "1-D uint8"),  # wrong dtype
        (SCHEMES[2], lambda p, _: p[:-4], "bytes, its index and scheme say"),  # a scale missing / length mismatch
        (SCHEMES[2], lambda p, _: np.concatenate([p, p[:1]]), "bytes, its index and scheme say"),
        (SCHEMES[2], _nan_scale, "NaN"),
        (SCHEMES[2], _bad_code, "outside the int8 range"),
        (SCHEMES[4], _index_out_of_range, "index out of range"),
        (SCHEMES[2], _shape, "has shape"),
        (SCHEMES[2], lambda p, i: i.update(scheme="int4") or p, "encoded as 'int4'"),
        (SCHEMES[2], lambda p, i: i.update(names=["x", "y", "z"]) or p, "lacks array"),
        (SCHEMES[2], lambda p, i: i.update(names=[*list(SHAPES)[:2], next(iter(SHAPES))]) or p, "names an array twice"),
    ],
)
def test_malformed_packed_updates_are_refused(
    scheme: Scheme, change: Callable[[np.ndarray, dict[str, object]], np.ndarray], match: str
) -> None:
    # Prepare
    content = _tampered(scheme, change)

    # Execute / Assert
    with pytest.raises(UpdateRejected, match=match):
        decode(content, keys.DELTA, scheme, SHAPES)


def test_per_key_arrays_and_a_scheme_the_round_does_not_expect_are_refused() -> None:
    # Prepare: the retired per-key format, the default packed float32, and int8
    per_key = RecordDict({keys.DELTA: record_from_arrays(_arrays())})
    default = Scheme.of(CompressionConfig(), "uplink")
    plain, _ = encode(_arrays(), keys.DELTA, default, rng_for(0, 1, "x"))
    packed, _ = encode(_arrays(), keys.DELTA, SCHEMES[2], rng_for(0, 1, "x"))

    # Execute / Assert
    for scheme in (default, SCHEMES[2]):
        with pytest.raises(UpdateRejected, match="must hold one array 'packed' and its index 'wire'"):
            decode(per_key, keys.DELTA, scheme, SHAPES)
    with pytest.raises(UpdateRejected, match="encoded as 'float32'"):
        decode(RecordDict(plain), keys.DELTA, SCHEMES[2], SHAPES)
    with pytest.raises(UpdateRejected, match="this round expects 'float32'"):
        decode(RecordDict(packed), keys.DELTA, default, SHAPES)


def test_read_arrays_decodes_the_scheme_a_message_names() -> None:
    # Prepare
    arrays = _arrays()
    messages = {s.name: RecordDict(encode(arrays, keys.DELTA, s, rng_for(0, 1, "x"))[0]) for s in SCHEMES}

    # Execute / Assert: what the round's own decode gives, for every scheme; an unknown scheme is refused
    for scheme in SCHEMES:
        got = read_arrays(messages[scheme.name], keys.DELTA)
        want = decode(messages[scheme.name], keys.DELTA, scheme, SHAPES)
        assert all(np.array_equal(got[k], want[k]) for k in SHAPES)
    messages["float32"].config_records[keys.WIRE]["scheme"] = "int3"
    with pytest.raises(UpdateRejected, match="names no known scheme"):
        read_arrays(messages["float32"], keys.DELTA)


def test_topk_error_feedback_in_context_state_sends_the_true_total_over_rounds() -> None:
    # Prepare: a site's state as Flower keeps it between rounds
    cfg = RunConfig.from_flat({"compression.uplink": "topk", "compression.topk-fraction": 0.1})
    scheme = Scheme.of(cfg.compression, "uplink")
    state = RecordDict()
    rng = np.random.default_rng(0)
    sent_total = {k: np.zeros(s) for k, s in SHAPES.items()}
    true_total = {k: np.zeros(s) for k, s in SHAPES.items()}

    # Execute: five rounds, each decoded the way the server decodes a reply
    for rnd in range(1, 6):
        delta = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
        records = encode_update(delta, cfg, rnd, "site 0", state)
        received = decode(RecordDict(records), keys.DELTA, scheme, SHAPES)
        for key in SHAPES:
            sent_total[key] += received[key]
            true_total[key] += delta[key]

    # Assert: what was sent plus what is still held back equals what was trained
    residual = {k: v.numpy() for k, v in state.array_records["fedtune.topk-residual"].items()}
    for key in SHAPES:
        np.testing.assert_allclose(sent_total[key] + residual[key], true_total[key], atol=1e-5)
        assert np.count_nonzero(received[key]) == math.ceil(0.1 * math.prod(SHAPES[key]))


def test_int8_with_the_default_block_costs_at_most_027_of_float32() -> None:
    # Prepare: SmolLM2's q/k/v/o LoRA matrices at r = 8 (30 layers)
    shapes = {}
    for layer in range(30):
        for mod, out in (("q", 576), ("k", 192), ("v", 192), ("o", 576)):
            shapes[f"l{layer}.{mod}.lora_A.weight"] = (8, 576)
            shapes[f"l{layer}.{mod}.lora_B.weight"] = (out, 8)
    cfg = RunConfig.from_flat({"compression.uplink": "int8"})

    # Execute
    ratio = encoded_bytes(shapes, Scheme.of(cfg.compression, "uplink")) / encoded_bytes(
        shapes, Scheme("float32", 256, 0.1)
    )

    # Assert
    assert ratio <= 0.27
