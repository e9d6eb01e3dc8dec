"""Adapter arrays <-> Flower records, plain or compressed, and their size on the wire."""

from __future__ import annotations

import io
import math
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from fedtune.core.arrays import Arrays
from fedtune.core.errors import UpdateRejected
from fedtune.wire import keys
from fedtune.wire.codec import PACKED, Scheme, Shapes, index_bytes, make_index, pack, packed_size, unpack


def record_from_arrays(arrays: Arrays) -> ArrayRecord:
    """Wrap numpy arrays, keeping their (PEFT state-dict) keys and order."""
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
    """Bytes of the adapter or delta a message carries: its arrays plus, when compressed, the index."""
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


def encoded_bytes(shapes: Shapes, scheme: Scheme | None) -> int:
    """What ``encode`` of float32 arrays of ``shapes`` puts on the wire, known before encoding."""
    if scheme is None:
        return sum(npy_bytes(s, "float32") for s in shapes.values())
    return npy_bytes((packed_size(shapes, scheme),), "uint8") + index_bytes(make_index(shapes, scheme))


def encode(
    arrays: Arrays, array_key: str, scheme: Scheme | None, rng: np.random.Generator, residual: Arrays | None = None
) -> tuple[dict[str, ArrayRecord | MetricRecord | ConfigRecord], Arrays | None]:
    """The records of ``arrays`` under ``array_key`` (plus the index when compressed), and the new
    top-k residual."""
    if scheme is None:
        return {array_key: record_from_arrays(arrays)}, None
    packed, index, left = pack(arrays, scheme, rng, residual)
    return {array_key: ArrayRecord(OrderedDict([(PACKED, Array(packed))])), keys.WIRE: ConfigRecord(index)}, left


def decode(content: RecordDict, array_key: str, scheme: Scheme | None, expected: Shapes | None = None) -> Arrays:
    """The float32 arrays under ``array_key``; a compressed one is checked against ``scheme`` and the
    ``expected`` names and shapes (UpdateRejected names what is wrong)."""
    record = content.array_records[array_key]
    if scheme is None:
        if keys.WIRE in content.config_records:
            raise UpdateRejected("the message is compressed, but this round expects float32 arrays")
        return arrays_from_record(record)
    index = content.config_records.get(keys.WIRE)
    if index is None or list(record) != [PACKED]:
        raise UpdateRejected(f"a {scheme.name} message must hold one array {PACKED!r} and its index {keys.WIRE!r}")
    return unpack(load_array(record[PACKED], PACKED), dict(index), scheme, expected)
