"""Adapter arrays <-> Flower ArrayRecords, and their size on the wire."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord

Arrays = dict[str, np.ndarray]


def record_from_arrays(arrays: Arrays) -> ArrayRecord:
    """Wrap numpy arrays, keeping their (PEFT state-dict) keys and order."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def arrays_from_record(record: ArrayRecord) -> Arrays:
    """Unwrap an ArrayRecord into numpy arrays by key."""
    return {k: v.numpy() for k, v in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record carries (what dominates a message on the wire)."""
    return sum(len(a.data) for a in record.values())
