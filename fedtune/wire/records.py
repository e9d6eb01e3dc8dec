"""Adapter arrays <-> Flower records and their size on the wire.

Every message that carries the adapter or a delta carries it packed (:mod:`fedtune.wire.codec`): one
uint8 array ``packed`` and its index under ``wire``; ``compression.* = none`` packs lossless float32.
:func:`encode` and :func:`decode` are the two ends; :func:`read_arrays` decodes whatever scheme a
message's own index names (a Flower user's own ClientApp reads fedtune's global adapter with it and
answers with ``encode(delta, "delta", Scheme.of(cfg.compression, "uplink"), rng)``). Per-key records
(:func:`record_from_arrays`) remain only for what a site keeps in its own ``context.state``.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from fedtune.core.arrays import Arrays
from fedtune.core.errors import UpdateRejected
from fedtune.wire import keys
from fedtune.wire.codec import (
    FLOAT32,
    PACKED,
    SCHEMES,
    Scheme,
    Shapes,
    index_bytes,
    make_index,
    pack,
    packed_size,
    select,
    unpack,
)


def record_from_arrays(arrays: Arrays) -> ArrayRecord:
    """Wrap numpy arrays, one per (PEFT state-dict) key, in order: for ``context.state``, not the wire."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def load_array(array: Array, name: str) -> np.ndarray:
    """``array`` as numpy, refusing (UpdateRejected, naming ``name``) bytes that are not one npy array of
    numbers whose header agrees with its payload: checked before numpy allocates what the header claims."""
    if array.stype != SType.NUMPY:
        raise UpdateRejected(f"array {name!r} is serialized as {array.stype!r}, not {SType.NUMPY!r}")
    data = array.data
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, _, dtype = read(buf)
    except Exception:  # whatever numpy's header parser makes of garbage bytes
        raise UpdateRejected(f"array {name!r} is not an npy array") from None
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise UpdateRejected(f"array {name!r} has dtype {dtype}, not a number type")
    need = math.prod(shape) * dtype.itemsize
    if len(data) - buf.tell() != need:
        raise UpdateRejected(
            f"array {name!r}: its header says {shape} {dtype} ({need} bytes), it carries {len(data) - buf.tell()}"
        )
    return np.load(io.BytesIO(data), allow_pickle=False)  # type: ignore[no-any-return]


def arrays_from_record(record: ArrayRecord) -> Arrays:
    """Unwrap an ArrayRecord into numpy arrays by key (UpdateRejected if one is not a valid npy array)."""
    return {k: load_array(v, k) for k, v in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record carries (what dominates a message on the wire)."""
    return sum(len(a.data) for a in record.values())


def message_bytes(content: RecordDict, array_key: str) -> int:
    """Bytes of the adapter or delta a message carries: its packed array plus the index."""
    total = payload_bytes(content.array_records[array_key]) if array_key in content.array_records else 0
    if keys.WIRE in content.config_records:
        total += index_bytes(content.config_records[keys.WIRE])
    return total


def npy_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes one array takes in a record (Flower stores it in npy format: header plus data)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return len(buf.getvalue()) + math.prod(shape) * np.dtype(dtype).itemsize


def encoded_bytes(shapes: Shapes, scheme: Scheme) -> int:
    """What ``encode`` of float32 arrays of ``shapes`` puts on the wire, known before encoding."""
    return npy_bytes((packed_size(shapes, scheme),), "uint8") + index_bytes(make_index(shapes, scheme))


def encode(
    arrays: Arrays, array_key: str, scheme: Scheme, rng: np.random.Generator, residual: Arrays | None = None
) -> tuple[dict[str, ArrayRecord | MetricRecord | ConfigRecord], Arrays | None]:
    """The records of ``arrays`` under ``array_key`` (one packed array) and ``wire`` (its index), and
    the new top-k residual."""
    packed, index, left = pack(arrays, scheme, rng, residual)
    return {array_key: ArrayRecord(OrderedDict([(PACKED, Array(packed))])), keys.WIRE: ConfigRecord(index)}, left


def decode(content: RecordDict, array_key: str, scheme: Scheme, expected: Shapes | None = None) -> Arrays:
    """The float32 arrays under ``array_key``, checked against ``scheme`` and, when given, the
    ``expected`` names and shapes (UpdateRejected names what is wrong)."""
    record = content.array_records.get(array_key)
    index = content.config_records.get(keys.WIRE)
    if record is None or index is None or list(record) != [PACKED]:
        got = list(record) if record is not None else "nothing"
        raise UpdateRejected(
            f"the {array_key!r} record must hold one array {PACKED!r} and its index {keys.WIRE!r} "
            f"({scheme.name}), got {_names(got)}{'' if index is not None else ' and no index'}"
        )
    return unpack(load_array(record[PACKED], PACKED), dict(index), scheme, expected)


def select_records(
    records: Mapping[str, ArrayRecord | MetricRecord | ConfigRecord], array_key: str, names: list[str]
) -> dict[str, ArrayRecord | MetricRecord | ConfigRecord]:
    """The records of an :func:`encode` output holding only the arrays ``names``, byte for byte as
    ``records`` carries them (:func:`fedtune.wire.codec.select`), in the scheme its own index names."""
    record, index = records[array_key], records[keys.WIRE]
    assert isinstance(record, ArrayRecord) and isinstance(index, ConfigRecord), "records from encode()"
    scheme = Scheme(str(index["scheme"]), int(index["block"]), float(index["fraction"]))  # type: ignore[arg-type]
    packed, kept = select(record[PACKED].numpy(), dict(index), names, scheme)
    return {array_key: ArrayRecord(OrderedDict([(PACKED, Array(packed))])), keys.WIRE: ConfigRecord(kept)}


def float32_records(arrays: Arrays, array_key: str) -> dict[str, ArrayRecord | MetricRecord | ConfigRecord]:
    """The records of ``arrays`` as a ``compression.* = none`` message carries them (lossless, packed)."""
    return encode(arrays, array_key, FLOAT32, np.random.default_rng(0))[0]


def read_arrays(content: RecordDict, array_key: str) -> Arrays:
    """The float32 arrays under ``array_key``, in the scheme the message's own index names (for a
    reader that does not know the round's ``compression.*``: a user's ClientApp, a test, a tool)."""
    index: Mapping[str, Any] = content.config_records.get(keys.WIRE) or {}
    name, block, fraction = index.get("scheme"), index.get("block"), index.get("fraction")
    if name not in SCHEMES or not isinstance(block, int) or not isinstance(fraction, float):
        raise UpdateRejected(f"the {keys.WIRE!r} index names no known scheme ({name!r}, block {block!r})")
    return decode(content, array_key, Scheme(str(name), block, fraction))


def _names(got: list[str] | str) -> str:
    if isinstance(got, str):
        return got
    return repr(got[:3])[:-1] + (f", ... {len(got)} arrays]" if len(got) > 3 else "]")
