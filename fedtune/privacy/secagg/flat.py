"""One flat vector per client: the delta at the global rank, in sorted PEFT-key order, and back.

SecAgg+ masks one vector of integers, so every client lays its delta out the same way: a lower-rank
site zero-pads to the global rank first (``lora.pad_rank``), and the server knows which entries each
rank covers (ranks are public), so it can divide each entry by the weight of the sites that trained it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.model.lora import pad_rank, rank_masks


def length(like: Arrays) -> int:
    """Entries of the flat vector for arrays shaped like ``like``."""
    return sum(int(np.prod(v.shape)) for v in like.values())


def flatten(arrays: Arrays, like: Arrays) -> np.ndarray:
    """``arrays`` zero-padded to ``like``'s shapes and concatenated in sorted key order, float64 (L,)."""
    if sorted(arrays) != sorted(like):
        raise ValueError(f"keys differ from the global adapter's: {sorted(set(arrays) ^ set(like))[:3]}")
    padded, _ = pad_rank(arrays, like)
    return np.concatenate([padded[k].astype(np.float64).ravel() for k in sorted(like)])


def unflatten(vector: np.ndarray, like: Arrays, dtype: type[np.floating[Any]] = np.float32) -> Arrays:
    """Inverse of :func:`flatten` at full rank: arrays (float32 unless ``dtype``) shaped like ``like``."""
    out, start = {}, 0
    for key in sorted(like):
        shape = like[key].shape
        size = int(np.prod(shape))
        out[key] = vector[start : start + size].reshape(shape).astype(dtype)
        start += size
    if start != vector.size:
        raise ValueError(f"vector has {vector.size} entries, the adapter {start}")
    return out


def coverage(rank: int, like: Arrays) -> np.ndarray:
    """1.0 for the flat entries a rank-``rank`` site trains, 0.0 for those it zero-pads, float64 (L,)."""
    masks = rank_masks(rank, like)
    return np.concatenate([np.broadcast_to(masks[k], like[k].shape).ravel() for k in sorted(like)])


def bands(ranks: Collection[int]) -> list[tuple[int, int, int]]:
    """The rank bands of sites with LoRA ``ranks``, lowest first: ``(first, last, sites)`` for the components
    ``first..last`` (1-based) that exactly the ``sites`` sites of rank >= ``last`` train. A rank of 0 (no
    LoRA) has no bands; components above the highest rank are trained by nobody and are left out."""
    out, below = [], 0
    for rank in sorted({r for r in ranks if r > 0}):
        out.append((below + 1, rank, sum(1 for r in ranks if r >= rank)))
        below = rank
    return out
