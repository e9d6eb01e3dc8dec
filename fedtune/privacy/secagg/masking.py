"""Masks over Z_{2^b}: expanding a 32-byte seed with ChaCha20, masking an input, unmasking a sum.

Each client i adds to its quantized input x_i a self mask PRG(b_i) and, for every neighbour j, a
pairwise mask +PRG(s_ij) if i < j else -PRG(s_ij), all modulo 2^b (Bonawitz et al. 2017,
https://eprint.iacr.org/2017/281, §4; Bell et al. 2020, https://eprint.iacr.org/2020/704, Algorithm 2).
Over the survivors S the pairwise masks between two survivors cancel, so

    sum_{i in S} y_i - sum_{i in S} PRG(b_i) - sum_{i in S, j dropped, j ~ i} sign(i, j) PRG(s_ij)
        = sum_{i in S} x_i  (mod 2^b).

The server learns b_i of every survivor and the mask secret key of every dropped client (hence s_ij)
from Shamir shares, never both for one client. The PRG is ChaCha20 keyed by the full 32-byte seed,
with a nonce derived from a context (the round and the run), so one seed never yields the same stream
in two rounds. Arithmetic is in uint32, whose wrap-around is modulo 2^32; masking to the low b bits
then gives arithmetic modulo 2^b, since 2^b divides 2^32.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

from fedtune.privacy.secagg.crypto import KEY_BYTES, MASK_INFO, shared_key
from fedtune.privacy.secagg.errors import SecAggError
from fedtune.wire.keys import MAX_MODULUS_BITS

# ChaCha20's 32-bit block counter covers 2^32 blocks of 64 bytes, i.e. 2^36 uint32 values.
_MAX_LENGTH = 1 << 36
#: Values expanded per stream at a time (256 KiB of uint32): small enough to stay in cache while added.
_CHUNK = 1 << 16
_BIG_ENDIAN = sys.byteorder == "big"


def round_context(round_id: int, run: bytes = b"") -> bytes:
    """Context for the mask PRG: binds the masks to one round of one run (``run``: any run identifier)."""
    return b"fedtune/secagg+/v1/mask" + struct.pack(">Q", round_id) + hashlib.sha256(run).digest()


def _modulus_mask(bits: int) -> np.uint32:
    if not 1 <= bits <= MAX_MODULUS_BITS:
        raise SecAggError(f"modulus bits must be in 1..{MAX_MODULUS_BITS}, got {bits}.")
    return np.uint32((1 << bits) - 1)


def _keystream(seed: bytes, context: bytes) -> CipherContext:
    """A ChaCha20 encryptor keyed by ``seed``; its output on zeros is the mask stream of ``context``.

    The 16-byte ChaCha20 nonce is a zero block counter followed by 12 bytes of SHA-256(``context``).
    """
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"a mask seed must be {KEY_BYTES} bytes, got {len(seed)}.")
    nonce = bytes(4) + hashlib.sha256(b"fedtune/secagg+/v1/nonce" + context).digest()[:12]
    return Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()


def _apply(out: np.ndarray, streams: Sequence[tuple[bytes, int]], context: bytes) -> None:
    """Add (sign +1) or subtract (sign -1) each seed's uint32 stream into ``out`` in place, modulo 2^32.

    The streams are expanded chunk by chunk into one reused buffer, all of them per chunk of ``out``,
    so each chunk of ``out`` is updated while it sits in cache and no stream is ever held whole. The
    values are not reduced to b bits here: 2^b divides 2^32, so the caller's final ``&`` gives the same
    result modulo 2^b as reducing every stream first.
    """
    if not 0 <= out.size <= _MAX_LENGTH:
        raise SecAggError(f"mask length must be in 0..2^36, got {out.size}.")
    ciphers = [(_keystream(seed, context), sign) for seed, sign in streams]
    zeros = memoryview(bytes(4 * min(_CHUNK, out.size)))
    buffer = np.empty(min(_CHUNK, out.size), dtype=np.uint32)
    for start in range(0, out.size, _CHUNK):
        target = out[start : start + _CHUNK]
        block = buffer[: target.size]
        for cipher, sign in ciphers:
            cipher.update_into(zeros[: 4 * target.size], block.view(np.uint8).data)
            if _BIG_ENDIAN:
                block.byteswap(inplace=True)  # the stream is read as little-endian uint32
            if sign > 0:
                target += block
            else:
                target -= block


def expand(seed: bytes, length: int, bits: int, context: bytes) -> np.ndarray:
    """``length`` uniform values in 0..2^bits-1 (uint32) from ChaCha20 keyed by the 32-byte ``seed``.

    The keystream is read as little-endian uint32 and reduced to its low ``bits`` bits.
    """
    if not 0 <= length <= _MAX_LENGTH:
        raise SecAggError(f"mask length must be in 0..2^36, got {length}.")
    modulus = _modulus_mask(bits)
    out = np.zeros(length, dtype=np.uint32)
    _apply(out, [(seed, 1)], context)
    out &= modulus
    return out


def pair_mask_keys(
    my_id: int, mask_private: bytes, peer_publics: Mapping[int, bytes], round_id: int
) -> dict[int, bytes]:
    """Seeds s_ij of the pairwise masks between ``my_id`` and each peer, by peer id.

    A client calls it with its own mask secret key and its neighbours' mask public keys; the server
    calls it with a dropped client's rebuilt secret key and its surviving neighbours' public keys, and
    gets the same seeds (the derivation is symmetric in the two ids).
    """
    return {
        peer: shared_key(mask_private, public, info=MASK_INFO, round_id=round_id, my_id=my_id, peer_id=peer)
        for peer, public in peer_publics.items()
    }


def _checked(values: np.ndarray, bits: int) -> np.ndarray:
    if values.ndim != 1 or values.dtype.kind != "u" or values.dtype.itemsize > 4:
        raise SecAggError(f"expected a 1-D unsigned vector of at most 32 bits, got {values.dtype} {values.shape}.")
    if values.size and int(values.max()) > int(_modulus_mask(bits)):
        raise SecAggError(f"input holds values of more than {bits} bits.")
    return values


def _check_input(values: np.ndarray, bits: int) -> np.ndarray:
    return _checked(values, bits).astype(np.uint32)  # a copy: the caller's array is never modified


def mask(
    quantized: np.ndarray,
    self_seed: bytes,
    pair_keys: Mapping[int, bytes],
    my_id: int,
    bits: int,
    context: bytes,
) -> np.ndarray:
    """``quantized`` + PRG(self_seed) + sum_j ±PRG(pair_keys[j]) modulo 2^bits, as uint32 (shape (L,)).

    The sign is + towards a peer with a larger id and - towards a smaller one, so the two masks of a pair cancel.
    """
    out = _check_input(quantized, bits)
    if my_id in pair_keys:
        raise SecAggError(f"client {my_id} lists itself as a neighbour.")
    streams = [(self_seed, 1), *((key, 1 if my_id < peer else -1) for peer, key in pair_keys.items())]
    _apply(out, streams, context)
    out &= _modulus_mask(bits)
    return out


def add(vectors: Iterable[np.ndarray], bits: int) -> np.ndarray:
    """The sum of masked uint vectors modulo 2^bits, as uint32; all must have the same length."""
    total: np.ndarray | None = None
    for v in vectors:
        if total is None:
            total = _check_input(v, bits)  # the one copy; the rest are added into it in place
            continue
        if _checked(v, bits).shape != total.shape:
            raise SecAggError(f"masked vectors differ in length: {total.shape} and {v.shape}.")
        total += v
    if total is None:
        raise SecAggError("no masked vectors to add.")
    total &= _modulus_mask(bits)
    return total


def unmask(
    masked_sum: np.ndarray,
    survivor_seeds: Mapping[int, bytes],
    dropped_pair_keys: Mapping[int, Mapping[int, bytes]],
    bits: int,
    context: bytes,
) -> np.ndarray:
    """The sum of the survivors' quantized inputs modulo 2^bits, from the sum of their masked inputs.

    ``survivor_seeds``: rebuilt self-mask seed b_i of every survivor i (whose masked input is in the sum).
    ``dropped_pair_keys[j][i]``: pairwise seed s_ij of dropped client j with each surviving neighbour i.
    """
    out = _check_input(masked_sum, bits)
    streams = [(seed, -1) for seed in survivor_seeds.values()]
    for dropped, keys in dropped_pair_keys.items():
        for survivor, key in keys.items():
            if survivor in dropped_pair_keys or survivor not in survivor_seeds:
                raise SecAggError(f"pair ({dropped}, {survivor}): client {survivor} is not a survivor.")
            # survivor added +PRG(s_ij) if survivor < dropped, else -PRG(s_ij); take that back out
            streams.append((key, -1 if survivor < dropped else 1))
    _apply(out, streams, context)
    out &= _modulus_mask(bits)
    return out
