"""Compressed updates: blockwise quantization with stochastic rounding, and top-k with error feedback.

Quantization (QSGD-style, Alistarh et al. 2017, https://arxiv.org/abs/1610.02132, with one absmax
scale per block as in Dettmers et al. 2022, https://arxiv.org/abs/2110.02861): each block of
``block`` values is divided by its largest magnitude s and mapped onto the signed integers
-L..L (L = 2^(bits-1) - 1) by stochastic rounding, which is unbiased: E[decode(encode(x))] = x, and
each value is off by less than one step s / L. 4-bit codes are packed two to a byte.

Top-k (Stich et al. 2018, https://arxiv.org/abs/1809.07599): only the k largest-magnitude entries
travel; what was left out is kept at the client and added to the next update (error feedback), so
over rounds everything is sent eventually: sum of sent + residual = sum of true updates.

Everything here is a plain function of numpy arrays; the random dither comes from the generator
passed in.
"""

from __future__ import annotations

import math

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.errors import UpdateRejected

SCALE = "::scale"  # suffix of a quantized array's per-block scales
INDEX = "::index"  # suffix of a sparse array's flat indices
BITS = (4, 8, 16)


def _levels(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {BITS}, got {bits}")
    return int(2 ** (bits - 1) - 1)


def quantize(x: np.ndarray, bits: int, block: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(codes, per-block scales) of ``x`` flattened: int16 codes for 16 bits, packed uint8 otherwise."""
    levels = _levels(bits)
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    pad = (-flat.size) % block
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, block)
    scales = np.abs(blocks).max(axis=1).astype(np.float32)  # (n_blocks,)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    scaled = blocks / safe[:, None] * levels  # in [-L, L]
    codes = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32)).clip(-levels, levels)
    codes = codes.astype(np.int16).reshape(-1)[: flat.size]
    if bits == 16:
        return codes, scales
    if bits == 8:
        return codes.astype(np.int8).view(np.uint8), scales
    nibbles = (codes + 8).astype(np.uint8)  # -7..7 -> 1..15
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))
    return (nibbles[0::2] << 4 | nibbles[1::2]).astype(np.uint8), scales


def dequantize(codes: np.ndarray, scales: np.ndarray, bits: int, block: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array of ``shape`` that ``quantize`` encoded; UpdateRejected if sizes disagree."""
    levels = _levels(bits)
    size = math.prod(shape)
    if bits == 16:
        values = codes.astype(np.int16, copy=False).astype(np.float32)
    elif bits == 8:
        values = codes.view(np.int8).astype(np.float32) if codes.dtype == np.uint8 else codes.astype(np.float32)
    else:
        packed = codes.astype(np.uint8, copy=False)
        values = np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1).astype(np.float32) - 8
    values = values[:size]
    n_blocks = -(-size // block)
    if values.size != size or scales.shape != (n_blocks,):
        raise UpdateRejected(f"compressed array has {values.size} values / {scales.size} scales for shape {shape}")
    padded = np.concatenate([values, np.zeros(n_blocks * block - size, np.float32)]).reshape(n_blocks, block)
    return (padded * (scales[:, None].astype(np.float32) / levels)).reshape(-1)[:size].reshape(shape)


def error_bound(scales: np.ndarray, bits: int) -> float:
    """Largest per-value error ``dequantize(quantize(x))`` can have: one step of the largest block."""
    return float(scales.max(initial=0.0)) / _levels(bits)


def top_k(x: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 indices, float32 values) of the ceil(fraction * size) largest-magnitude entries."""
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    k = max(1, math.ceil(fraction * flat.size)) if flat.size else 0
    chosen = np.arange(flat.size) if k >= flat.size else np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
    idx = np.sort(chosen).astype(np.int32)
    return idx, flat[idx]


def densify(indices: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The dense float32 array with ``values`` at flat ``indices``; UpdateRejected on bad indices."""
    size = math.prod(shape)
    if indices.shape != values.shape or (indices.size and (indices.min() < 0 or indices.max() >= size)):
        raise UpdateRejected(f"sparse array indices do not fit shape {shape}")
    out = np.zeros(size, np.float32)
    out[indices.astype(np.int64)] = values
    return out.reshape(shape)


def sparsify_with_feedback(delta: Arrays, residual: Arrays, fraction: float) -> tuple[Arrays, Arrays]:
    """Top-k of (delta + residual) per array, as ``{key: values, key::index: indices}``, and the new
    residual (what was not sent)."""
    sent: Arrays = {}
    left: Arrays = {}
    for key, value in delta.items():
        total = value.astype(np.float32) + residual.get(key, 0.0)
        idx, vals = top_k(total, fraction)
        sent[key], sent[key + INDEX] = vals, idx
        rest = total.reshape(-1).copy()
        rest[idx] = 0.0
        left[key] = rest.reshape(value.shape)
    return sent, left
