"""Key agreement, key derivation and authenticated encryption for SecAgg+, all from ``cryptography``.

Each sampled client makes two fresh X25519 key pairs every round (Bell et al. 2020,
https://eprint.iacr.org/2020/704, Algorithm 2, following Bonawitz et al. 2017,
https://eprint.iacr.org/2017/281, §4): an *encryption* pair, whose agreed keys encrypt the Shamir shares
sent between neighbours, and a *mask* pair, whose agreed keys seed the pairwise masks. Only the mask
secret key is ever secret-shared; keeping the pairs apart means that recovering a dropped client's masks
never lets the server decrypt the shares that client exchanged.

Each agreed secret goes through HKDF-SHA256 (RFC 5869) with an ``info`` label for its use and a salt
that binds the round and the unordered pair of client ids, so no derived key serves two uses, two
rounds or two pairs. AES-GCM (a random 96-bit nonce per message) authenticates the sender, recipient,
round and stage through its associated data, so a share replayed to another round, recipient or stage
fails to open.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.privacy.secagg.errors import SecAggError

#: HKDF ``info`` for the key that encrypts shares between two clients.
ENCRYPTION_INFO = b"fedtune/secagg+/v1/share-encryption"
#: HKDF ``info`` for the seed of the pairwise mask between two clients.
MASK_INFO = b"fedtune/secagg+/v1/pairwise-mask"

KEY_BYTES = 32
NONCE_BYTES = 12
_ID = struct.Struct(">Q")  # client ids are Flower node ids: unsigned 64-bit


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"KeyPair(public={self.public.hex()[:16]}…)"


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the OS's entropy pool."""
    key = X25519PrivateKey.generate()
    return KeyPair(key.private_bytes_raw(), key.public_key().public_bytes_raw())


def check_public_key(key: object, what: str) -> bytes:
    """``key`` if it is a usable X25519 public key; else ``SecAggError`` naming ``what`` (e.g. "client 7's mask key").

    A key must be 32 bytes and not one of the small-order points (RFC 7748, §6.1: u = 0, 1, p-1, p, p+1
    and the two order-8 points), with which every agreement gives the all-zero secret. ``cryptography``
    refuses that secret (OpenSSL checks it), so one agreement with a throwaway key finds them: a
    small-order point sends every clamped scalar, a multiple of 8, to zero.
    """
    if not isinstance(key, bytes):
        raise SecAggError(f"{what} must be bytes, got {type(key).__name__}.")
    if len(key) != KEY_BYTES:
        raise SecAggError(f"{what} must be {KEY_BYTES} bytes, got {len(key)}.")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError:
        raise SecAggError(f"{what} is a low-order X25519 point: every key agreed with it is all zeros.") from None
    return key


def pair_salt(round_id: int, id_a: int, id_b: int) -> bytes:
    """HKDF salt binding the round and the unordered pair {id_a, id_b}; both clients derive the same."""
    if id_a == id_b:
        raise SecAggError(f"a client cannot agree a key with itself (id {id_a}).")
    lo, hi = sorted((id_a, id_b))
    return b"fedtune/secagg+/v1/pair" + _ID.pack(round_id) + _ID.pack(lo) + _ID.pack(hi)


def shared_key(private: bytes, peer_public: bytes, *, info: bytes, round_id: int, my_id: int, peer_id: int) -> bytes:
    """The 32-byte key that ``my_id`` (holding ``private``) and ``peer_id`` (``peer_public``) both derive.

    X25519 agreement, then HKDF-SHA256 with ``info`` (``ENCRYPTION_INFO`` or ``MASK_INFO``) and
    ``pair_salt(round_id, my_id, peer_id)``. Raises ``SecAggError`` for a malformed or low-order public key.
    """
    try:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # wrong length, or a low-order point that gives the all-zero secret
        raise SecAggError(f"key agreement between clients {my_id} and {peer_id} failed: {e}") from e
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=pair_salt(round_id, my_id, peer_id), info=info)
    return hkdf.derive(secret)


def message_aad(*, round_id: int, stage: str, sender: int, recipient: int) -> bytes:
    """Associated data that binds a ciphertext to its round, protocol stage, sender and recipient."""
    return b"fedtune/secagg+/v1/" + stage.encode() + b"/" + _ID.pack(round_id) + _ID.pack(sender) + _ID.pack(recipient)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encryption of ``plaintext`` under ``key``: a fresh random 96-bit nonce || ciphertext+tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of ``blob`` from ``seal``; raises ``SecAggError`` if it was altered or ``aad`` differs."""
    if len(blob) < NONCE_BYTES + 16:
        raise SecAggError(f"ciphertext of {len(blob)} bytes is too short to hold a nonce and a tag.")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as e:
        raise SecAggError(
            "ciphertext failed authentication: altered, or meant for another round, stage or recipient."
        ) from e
