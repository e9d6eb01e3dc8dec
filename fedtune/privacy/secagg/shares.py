"""Shamir secret sharing of 32-byte secrets with pycryptodome, and a commitment that catches bad combines.

A client splits its self-mask seed and its mask secret key among its share holders so that any
``threshold`` of them can rebuild either one (Shamir 1979, https://doi.org/10.1145/359168.359176;
Bonawitz et al. 2017, https://eprint.iacr.org/2017/281, §4). pycryptodome's
``Crypto.Protocol.SecretSharing.Shamir`` shares 16-byte secrets over GF(2^128), so a 32-byte secret is
shared as two independent halves. It silently returns garbage when given fewer shares than the
threshold, so each share also carries the threshold and the first 8 bytes of SHA-256 over the secret,
and ``combine`` checks both. The threshold a share carries is the sender's word, so ``combine`` also
takes the round's threshold and refuses any share that claims another: a single share forged with
threshold 1 would otherwise be the whole polynomial, and so choose the secret.

A share's bytes: index (u16) | threshold (u16) | share of the first half (16) | share of the second
half (16) | commitment (8). The index is the recipient's 1-based position in the holder list.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

from Crypto.Protocol.SecretSharing import Shamir

from fedtune.privacy.secagg.errors import SecAggError, TooFewSurvivors

SECRET_BYTES = 32
_HALF = 16
_COMMIT = 8
_HEAD = struct.Struct(">HH")
SHARE_BYTES = _HEAD.size + 2 * _HALF + _COMMIT
_MAX_HOLDERS = 0xFFFF


def commitment(secret: bytes) -> bytes:
    """First 8 bytes of SHA-256 over a domain label and ``secret``: enough to detect a wrong reconstruction."""
    return hashlib.sha256(b"fedtune/secagg+/v1/share-commitment" + secret).digest()[:_COMMIT]


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of the 32-byte ``secret``, one per holder id; any ``threshold`` of them rebuild it.

    The share for ``holders[i]`` has index i+1. Randomness comes from pycryptodome's ``get_random_bytes``.
    """
    n = len(holders)
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a shared secret must be {SECRET_BYTES} bytes, got {len(secret)}.")
    if len(set(holders)) != n:
        raise SecAggError(f"share holders must be distinct, got {list(holders)}.")
    if not 1 <= threshold <= n <= _MAX_HOLDERS:
        raise SecAggError(f"need 1 <= threshold <= holders <= {_MAX_HOLDERS}, got threshold {threshold}, {n} holders.")
    first = Shamir.split(threshold, n, secret[:_HALF], ssss=False)
    second = Shamir.split(threshold, n, secret[_HALF:], ssss=False)
    commit = commitment(secret)
    out = {}
    for holder, (idx, a), (idx_b, b) in zip(holders, first, second, strict=True):
        assert idx == idx_b  # pycryptodome numbers shares 1..n in order
        out[holder] = _HEAD.pack(idx, threshold) + a + b + commit
    return out


def _parse(share: bytes) -> tuple[int, int, bytes, bytes, bytes]:
    """(index, threshold, first-half share, second-half share, commitment) of a serialized share."""
    if len(share) != SHARE_BYTES:
        raise SecAggError(f"a share must be {SHARE_BYTES} bytes, got {len(share)}.")
    idx, threshold = _HEAD.unpack_from(share)
    body = share[_HEAD.size :]
    return idx, threshold, body[:_HALF], body[_HALF : 2 * _HALF], body[2 * _HALF :]


def combine(shares: Iterable[bytes], threshold: int) -> bytes:
    """The 32-byte secret rebuilt from at least ``threshold`` (the round's t) distinct shares of it.

    Raises ``SecAggError`` when a share carries another threshold than ``threshold``, when the shares
    disagree or the result does not match the commitment, and ``TooFewSurvivors`` with fewer than
    ``threshold`` distinct shares.
    """
    if threshold < 1:
        raise SecAggError(f"the round's threshold must be >= 1, got {threshold}.")
    parsed: dict[int, tuple[int, int, bytes, bytes, bytes]] = {}
    for share in shares:
        entry = _parse(share)
        if entry[1] != threshold:
            raise SecAggError(
                f"share {entry[0]} claims threshold {entry[1]}, but the round's is {threshold}: forged or corrupt."
            )
        if parsed.setdefault(entry[0], entry) != entry:
            raise SecAggError(f"two different shares carry index {entry[0]}.")
    if len(parsed) < threshold:
        raise TooFewSurvivors(f"{len(parsed)} shares cannot rebuild a secret that needs {threshold}.")
    commits = {p[4] for p in parsed.values()}
    if len(commits) != 1:
        raise SecAggError("shares of one secret disagree on their commitment.")
    # Exactly `threshold` points fix the polynomial; more would only cost time.
    chosen = [parsed[i] for i in sorted(parsed)[:threshold]]
    first = Shamir.combine([(p[0], p[2]) for p in chosen], ssss=False)
    secret = first + Shamir.combine([(p[0], p[3]) for p in chosen], ssss=False)
    if commitment(secret) != commits.pop():
        raise SecAggError("rebuilt secret does not match its commitment: a share was corrupted or forged.")
    return secret
