"""LoRA-aware array maths: rank slices and zero-padding for heterogeneous ranks, FFA key sets."""

from __future__ import annotations

import numpy as np

from fedtune.core.arrays import Arrays

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def rank_of(arrays: Arrays) -> int | None:
    """The LoRA rank of an adapter (rows of its A matrices), or None without LoRA keys."""
    for key, value in arrays.items():
        if LORA_A in key:
            return int(value.shape[0])
    return None


def rank_slice(arrays: Arrays, rank: int) -> Arrays:
    """The first ``rank`` components: A (r, in) -> (rank, in), B (out, r) -> (out, rank)."""
    out = {}
    for key, value in arrays.items():
        if LORA_A in key:
            out[key] = value[:rank]
        elif LORA_B in key:
            out[key] = value[:, :rank]
        else:
            out[key] = value
    return out


def pad_rank(arrays: Arrays, like: Arrays) -> tuple[Arrays, Arrays]:
    """Zero-pad a lower-rank adapter to ``like``'s shapes; also return 0/1 coverage masks that say
    which entries the site actually trained (broadcastable to each array)."""
    padded, masks = {}, {}
    for key, target in like.items():
        value = arrays[key]
        out = np.zeros(target.shape, dtype=value.dtype)
        out[tuple(slice(0, n) for n in value.shape)] = value
        mask = np.zeros(target.shape, dtype=np.float64)
        mask[tuple(slice(0, n) for n in value.shape)] = 1.0
        padded[key], masks[key] = out, mask
    return padded, masks


def full_rank_like(arrays: Arrays, rank: int) -> Arrays:
    """Zero-stride stand-ins shaped like ``arrays`` at LoRA rank ``rank``: A (rank, in), B (out, rank)."""
    out = {}
    for key, value in arrays.items():
        shape = value.shape
        if LORA_A in key:
            shape = (rank, *value.shape[1:])
        elif LORA_B in key:
            shape = (value.shape[0], rank, *value.shape[2:])
        out[key] = np.broadcast_to(np.float32(0), shape)
    return out


def rank_masks(rank: int, like: Arrays) -> Arrays:
    """0/1 masks (float64, broadcastable to ``like``'s arrays) of the entries a rank-``rank`` site trains,
    as :func:`pad_rank` returns them for such a site's update."""
    _, masks = pad_rank(full_rank_like(like, rank), like)
    return masks


def sent_keys(arrays: Arrays, freeze_a: bool) -> list[str]:
    """Keys a client sends: all of them, or under FFA-LoRA only the B matrices (and non-LoRA)."""
    return [k for k in arrays if not (freeze_a and LORA_A in k)]
