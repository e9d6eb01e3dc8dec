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
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedtune.privacy.secagg.crypto import KEY_BYTES, MASK_INFO, shared_key
from fedtune.privacy.secagg.errors import SecAggError
from fedtune.privacy.secagg.quantize import MAX_MODULUS_BITS

# ChaCha20's 32-bit block counter covers 2^32 blocks of 64 bytes, i.e. 2^36 uint32 values.
_MAX_LENGTH = 1 << 36


def round_context(round_id: int, run: bytes = b"") -> bytes:
    """Context for the mask PRG: binds the masks to one round of one run (``run``: any run identifier)."""
    return b"fedtune/secagg+/v1/mask" + struct.pack(">Q", round_id) + hashlib.sha256(run).digest()


def _modulus_mask(bits: int) -> np.uint32:
    if not 1 <= bits <= MAX_MODULUS_BITS:
        raise SecAggError(f"modulus bits must be in 1..{MAX_MODULUS_BITS}, got {bits}.")
    return np.uint32((1 << bits) - 1)


def expand(seed: bytes, length: int, bits: int, context: bytes) -> np.ndarray:
    """``length`` uniform values in 0..2^bits-1 (uint32) from ChaCha20 keyed by the 32-byte ``seed``.

    The 16-byte ChaCha20 nonce is a zero block counter followed by 12 bytes of SHA-256(``context``).
    """
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"a mask seed must be {KEY_BYTES} bytes, got {len(seed)}.")
    if not 0 <= length <= _MAX_LENGTH:
        raise SecAggError(f"mask length must be in 0..2^36, got {length}.")
    nonce = bytes(4) + hashlib.sha256(b"fedtune/secagg+/v1/nonce" + context).digest()[:12]
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(4 * length))
    out = np.frombuffer(stream, dtype="<u4").astype(np.uint32)  # a writable, native-order copy
    out &= _modulus_mask(bits)
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


def _check_input(values: np.ndarray, bits: int) -> np.ndarray:
    if values.ndim != 1 or values.dtype.kind != "u" or values.dtype.itemsize > 4:
        raise SecAggError(f"expected a 1-D unsigned vector of at most 32 bits, got {values.dtype} {values.shape}.")
    if values.size and int(values.max()) > int(_modulus_mask(bits)):
        raise SecAggError(f"input holds values of more than {bits} bits.")
    return values.astype(np.uint32)  # a copy: the caller's array is never modified


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
    out += expand(self_seed, out.size, bits, context)
    for peer, key in pair_keys.items():
        if peer == my_id:
            raise SecAggError(f"client {my_id} lists itself as a neighbour.")
        if my_id < peer:
            out += expand(key, out.size, bits, context)
        else:
            out -= expand(key, out.size, bits, context)
    out &= _modulus_mask(bits)
    return out


def add(vectors: Iterable[np.ndarray], bits: int) -> np.ndarray:
    """The sum of masked uint vectors modulo 2^bits, as uint32; all must have the same length."""
    total: np.ndarray | None = None
    for v in vectors:
        v = _check_input(v, bits)
        if total is not None and v.shape != total.shape:
            raise SecAggError(f"masked vectors differ in length: {total.shape} and {v.shape}.")
        total = v if total is None else total + v
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
    for seed in survivor_seeds.values():
        out -= expand(seed, out.size, bits, context)
    for dropped, keys in dropped_pair_keys.items():
        for survivor, key in keys.items():
            if survivor in dropped_pair_keys or survivor not in survivor_seeds:
                raise SecAggError(f"pair ({dropped}, {survivor}): client {survivor} is not a survivor.")
            # survivor added +PRG(s_ij) if survivor < dropped, else -PRG(s_ij); take that back out
            if survivor < dropped:
                out -= expand(key, out.size, bits, context)
            else:
                out += expand(key, out.size, bits, context)
    out &= _modulus_mask(bits)
    return out
