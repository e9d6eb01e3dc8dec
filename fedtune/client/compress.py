"""A site's uplink encoding: its delta quantized or sparsified, with top-k's error feedback kept in
``context.state`` so it survives between rounds on every backend and in the site worker."""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.wire import keys
from fedtune.wire.codec import Scheme, rng_for
from fedtune.wire.records import arrays_from_record, encode, record_from_arrays

RESIDUAL_KEY = "fedtune.topk-residual"  # context.state ArrayRecord: what top-k has not sent yet


def load_residual(state: RecordDict, like: Arrays) -> Arrays:
    """The residual kept for the arrays of ``like`` (by PEFT key); a key whose shape changed starts at 0."""
    stored = state.array_records.get(RESIDUAL_KEY)
    if stored is None:
        return {}
    return {k: v for k, v in arrays_from_record(stored).items() if k in like and v.shape == like[k].shape}


def encode_update(delta: Arrays, cfg: RunConfig, rnd: int, site_name: str, state: RecordDict) -> dict[str, Any]:
    """The reply's records for ``delta`` under ``compression.uplink``: one packed array (lossless
    float32 under ``none``) and its index. Top-k adds the residual first and keeps what it did not send; the rounding
    dither comes from a generator seeded by ``seed``, the round and the site."""
    scheme = Scheme.of(cfg.compression, "uplink")
    residual = load_residual(state, delta) if scheme.name == "topk" else None
    rng = rng_for(cfg.seed, rnd, site_name)
    records, left = encode(delta, keys.DELTA, scheme, rng, residual)
    if left is not None:
        kept = state.array_records.get(RESIDUAL_KEY)
        others = {k: v for k, v in arrays_from_record(kept).items() if k not in left} if kept is not None else {}
        state.array_records[RESIDUAL_KEY] = record_from_arrays({**others, **left})
    return records
