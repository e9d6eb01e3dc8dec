"""The wire format: every message's arrays (global adapter or delta) as one uint8 array plus a small index.

Flower sends each array of an ArrayRecord as its own chunked message part (one request per array
in deployment, each with its own npy header), so an update of 240 LoRA matrices is 240 transfers.
fedtune's messages instead carry **one** array ``packed`` (uint8) and a ConfigRecord index
(scheme, block size, top-k fraction, array names and shapes), whatever ``compression.*`` says:
``none`` is lossless float32 in this format. The bytes are laid out as

    [every array's head, in index order][every array's tail, in index order]

where, for a quantized array (``int16`` / ``int8`` / ``int4``, see :mod:`fedtune.compression`), the
head is its float32 block scales and the tail its codes, and for ``topk`` the head is the float32
values and the tail their int32 flat indices. Every section's size follows from the shapes and the
settings, so a reader checks the total length before it slices anything, and every section is
aligned for its dtype. :func:`unpack` refuses anything malformed with one line naming the array.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.config import CompressionConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import UpdateRejected
from fedtune.wire.compression import SCALE, dequantize, quantize, sparsify_with_feedback

Shapes = Mapping[str, tuple[int, ...]]
PACKED = "packed"  # the one array of a compressed ArrayRecord
BITS = {"int16": 16, "int8": 8, "int4": 4}
SCHEMES = ("float32", *BITS, "topk")
_CODE_DTYPE: dict[str, np.dtype[Any]] = {
    "int16": np.dtype("<i2"),
    "int8": np.dtype(np.int8),
    "int4": np.dtype(np.uint8),
}


@dataclass(frozen=True)
class Scheme:
    """One direction's encoding: ``name`` is float32 (lossless, packed), int16, int8, int4 or topk."""

    name: str
    block: int
    fraction: float

    @classmethod
    def of(cls, cfg: CompressionConfig, direction: str) -> Scheme:
        """The scheme ``compression.<direction>`` selects; ``none`` is lossless :data:`FLOAT32`."""
        name = cfg.uplink if direction == "uplink" else cfg.downlink
        return FLOAT32 if name in ("none", "float32") else cls(name, cfg.block_size, cfg.topk_fraction)

    @property
    def lossless(self) -> bool:
        """Whether decoding gives back exactly the float32 values encoded (``float32``)."""
        return self.name == "float32"

    def sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Bytes of (head, tail) for one array of ``shape``."""
        size = math.prod(shape)
        if self.name == "float32":
            return 4 * size, 0
        if self.name == "topk":
            k = min(size, max(1, math.ceil(self.fraction * size))) if size else 0
            return 4 * k, 4 * k
        codes = 2 * size if self.name == "int16" else size if self.name == "int8" else (size + 1) // 2
        return 4 * -(-size // self.block), codes


FLOAT32 = Scheme("float32", 1, 1.0)
"""Lossless float32 (``compression.* = none`` or ``float32``): blocks and top-k do not apply, so its index
always says block 1, fraction 1.0, whatever ``compression.block-size`` and ``topk-fraction`` are."""


def rng_for(seed: int, rnd: int, who: str) -> np.random.Generator:
    """The stochastic-rounding generator of one site (or the server) in one round, from ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, rnd, zlib.crc32(who.encode())]))


def index_bytes(index: Mapping[str, Any]) -> int:
    """Bytes an index adds to a message: its strings and 8 per number."""
    total = 0
    for value in index.values():
        items = value if isinstance(value, list) else [value]
        total += sum(len(v.encode()) if isinstance(v, str) else 8 for v in items)
    return total


def packed_size(shapes: Shapes, scheme: Scheme) -> int:
    """Length of the packed array for arrays of ``shapes``."""
    return sum(sum(scheme.sizes(s)) for s in shapes.values())


def make_index(shapes: Shapes, scheme: Scheme) -> dict[str, Any]:
    """The ConfigRecord entries describing a packed update of ``shapes``."""
    return {
        "scheme": scheme.name,
        "block": scheme.block,
        "fraction": scheme.fraction,
        "names": list(shapes),
        "ndims": [len(s) for s in shapes.values()],
        "dims": [d for s in shapes.values() for d in s],
    }


def pack(
    arrays: Arrays, scheme: Scheme, rng: np.random.Generator, residual: Arrays | None = None
) -> tuple[np.ndarray, dict[str, Any], Arrays | None]:
    """(packed uint8 array, index, new top-k residual or None) of float ``arrays``."""
    heads: list[np.ndarray] = []
    tails: list[np.ndarray] = []
    left = None
    if scheme.name == "topk":
        sent, left = sparsify_with_feedback(arrays, residual or {}, scheme.fraction)
        for key in arrays:
            heads.append(sent[key].astype("<f4"))
            tails.append(sent[key + "::index"].astype("<i4"))
    elif scheme.name == "float32":
        for value in arrays.values():
            heads.append(np.asarray(value, "<f4").reshape(-1))
            tails.append(np.zeros(0, np.uint8))
    else:
        for value in arrays.values():
            codes, scales = quantize(value, BITS[scheme.name], scheme.block, rng)
            heads.append(scales.astype("<f4"))
            tails.append(codes.astype(_CODE_DTYPE[scheme.name]))
    parts = [np.frombuffer(np.ascontiguousarray(p).tobytes(), np.uint8) for p in [*heads, *tails]]
    packed = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return packed, make_index({k: tuple(v.shape) for k, v in arrays.items()}, scheme), left


def index_shapes(index: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The names and shapes an index describes; UpdateRejected if it is malformed."""
    names, ndims, dims = index.get("names"), index.get("ndims"), index.get("dims")
    ok = all(isinstance(x, list) for x in (names, ndims, dims))
    ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in ndims)  # type: ignore[union-attr]
    if not ok or len(names) != len(ndims) or sum(ndims) != len(dims):  # type: ignore[arg-type]
        raise UpdateRejected("the packed update's index is malformed (names, ndims and dims disagree)")
    if len(set(names)) != len(names):  # type: ignore[arg-type]
        raise UpdateRejected("the packed update's index names an array twice")
    shapes, at = {}, 0
    for name, nd in zip(names, ndims, strict=True):  # type: ignore[arg-type]
        shape = tuple(dims[at : at + nd])  # type: ignore[index]
        if not isinstance(name, str) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise UpdateRejected(f"the packed update's index entry {name!r} is malformed")
        shapes[name], at = shape, at + nd
    return shapes


def unpack(packed: np.ndarray, index: Mapping[str, Any], scheme: Scheme, expected: Shapes | None = None) -> Arrays:
    """The float32 arrays a packed update carries, checked strictly against ``scheme`` and, when given,
    the ``expected`` names and shapes (the server's view; a client reading the downlink passes None)."""
    got = (index.get("scheme"), index.get("block"), index.get("fraction"))
    if got != (scheme.name, scheme.block, scheme.fraction):
        raise UpdateRejected(
            f"the update is encoded as {got[0]!r} (block {got[1]!r}, fraction {got[2]!r}); this round expects "
            f"{scheme.name!r} (block {scheme.block}, fraction {scheme.fraction})"
        )
    shapes = index_shapes(index)
    if expected is not None:
        for key in expected:
            if key not in shapes:
                raise UpdateRejected(f"the packed index lacks array {key!r}")
        for key, shape in shapes.items():
            if key not in expected:
                raise UpdateRejected(f"the packed index has unexpected array {key!r}")
            if shape != tuple(expected[key]):
                raise UpdateRejected(f"packed array {key!r} has shape {shape}, expected {tuple(expected[key])}")
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 1:
        raise UpdateRejected(f"the packed update must be a 1-D uint8 array, got {getattr(packed, 'dtype', packed)}")
    want = packed_size(shapes, scheme)
    if packed.size != want:
        raise UpdateRejected(f"the packed update has {packed.size} bytes, its index and scheme say {want}")
    sizes = [scheme.sizes(s) for s in shapes.values()]
    head_at, tail_at = 0, sum(h for h, _ in sizes)
    out: Arrays = {}
    for (key, shape), (head, tail) in zip(shapes.items(), sizes, strict=True):
        first, second = packed[head_at : head_at + head], packed[tail_at : tail_at + tail]
        head_at, tail_at = head_at + head, tail_at + tail
        out[key] = _decode_one(key, shape, first, second, scheme)
    return out


def select(
    packed: np.ndarray, index: Mapping[str, Any], names: list[str], scheme: Scheme
) -> tuple[np.ndarray, dict[str, Any]]:
    """(packed, index) of only the arrays ``names`` of a packed update, in the index's order: each one's
    head and tail are the very bytes it has in ``packed``, so it decodes to exactly the same values
    whatever the scheme (a quantized array keeps its scales and codes)."""
    shapes = index_shapes(index)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise UpdateRejected(f"the packed update has no array {missing[0]!r} to select")
    sizes = [scheme.sizes(s) for s in shapes.values()]
    head_at, tail_at = 0, sum(h for h, _ in sizes)
    heads, tails, kept = [], [], {}
    for (key, shape), (head, tail) in zip(shapes.items(), sizes, strict=True):
        if key in names:
            heads.append(packed[head_at : head_at + head])
            tails.append(packed[tail_at : tail_at + tail])
            kept[key] = shape
        head_at, tail_at = head_at + head, tail_at + tail
    parts = [*heads, *tails]
    out = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return out, make_index(kept, scheme)


def _decode_one(key: str, shape: tuple[int, ...], head: np.ndarray, tail: np.ndarray, scheme: Scheme) -> np.ndarray:
    size = math.prod(shape)
    values = head.view("<f4")
    if not np.isfinite(values).all():
        what = "scales" if scheme.name in BITS else "values"
        raise UpdateRejected(f"{key!r}: its {what} hold NaN or Inf")
    if scheme.name == "float32":
        return values.reshape(shape).copy()
    if scheme.name == "topk":
        idx = tail.view("<i4")
        if idx.size and (idx[0] < 0 or idx[-1] >= size or (np.diff(idx) <= 0).any()):
            raise UpdateRejected(f"{key!r}: top-k index out of range 0..{size - 1} or not strictly increasing")
        dense = np.zeros(size, np.float32)
        dense[idx] = values
        return dense.reshape(shape)
    if (values < 0).any():
        raise UpdateRejected(f"{key!r}{SCALE} holds a negative scale")
    codes = tail.view(_CODE_DTYPE[scheme.name])
    bits = BITS[scheme.name]
    if bits == 4:  # nibble 0 would be code -8; the low nibble of an odd-sized array's last byte is padding
        probe = np.concatenate([codes >> 4, (codes & 0x0F)[: size // 2]])
        lowest = 1
    else:
        probe, lowest = codes, -(2 ** (bits - 1) - 1)
    if probe.size and probe.min() < lowest:
        raise UpdateRejected(f"{key!r}: a code is outside the {scheme.name} range")
    return dequantize(codes, values, bits, scheme.block, shape)
