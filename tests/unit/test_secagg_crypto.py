"""SecAgg+ key agreement and AES-GCM: both sides agree, keys are fresh per round and pair, tampering fails."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtune.privacy.secagg.crypto import (
    ENCRYPTION_INFO,
    MASK_INFO,
    NONCE_BYTES,
    check_public_key,
    generate_keypair,
    message_aad,
    open_,
    seal,
    shared_key,
)
from fedtune.privacy.secagg.errors import SecAggError


def aad(round_id: int = 3, stage: str = "share-keys", sender: int = 11, recipient: int = 22) -> bytes:
    return message_aad(round_id=round_id, stage=stage, sender=sender, recipient=recipient)


def test_both_clients_derive_the_same_key_and_an_outsider_does_not() -> None:
    # Prepare
    a, b, c = generate_keypair(), generate_keypair(), generate_keypair()
    # Execute
    k_ab = shared_key(a.private, b.public, info=MASK_INFO, round_id=1, my_id=5, peer_id=9)
    k_ba = shared_key(b.private, a.public, info=MASK_INFO, round_id=1, my_id=9, peer_id=5)
    k_cb = shared_key(c.private, b.public, info=MASK_INFO, round_id=1, my_id=5, peer_id=9)
    # Assert
    assert k_ab == k_ba and len(k_ab) == 32
    assert k_cb != k_ab


def test_keys_differ_by_use_round_and_pair() -> None:
    # Prepare
    a, b = generate_keypair(), generate_keypair()

    def key(info: bytes = MASK_INFO, round_id: int = 1, ids: tuple[int, int] = (5, 9)) -> bytes:
        return shared_key(a.private, b.public, info=info, round_id=round_id, my_id=ids[0], peer_id=ids[1])

    # Execute
    keys = [key(), key(info=ENCRYPTION_INFO), key(round_id=2), key(ids=(5, 10)), key(ids=(4, 9))]
    # Assert
    assert len(set(keys)) == len(keys)


def test_every_key_pair_is_fresh() -> None:
    pairs = [generate_keypair() for _ in range(20)]
    assert len({p.private for p in pairs}) == 20 and len({p.public for p in pairs}) == 20
    assert pairs[0].private.hex() not in repr(pairs[0])


def test_a_low_order_public_key_is_refused() -> None:
    with pytest.raises(SecAggError, match="key agreement"):
        shared_key(generate_keypair().private, bytes(32), info=MASK_INFO, round_id=1, my_id=1, peer_id=2)


P = 2**255 - 19
# The small-order u-coordinates of Curve25519 (RFC 7748 §6.1 tells to refuse the all-zero secret they give;
# libsodium lists them): 0, 1, the two points of order 8, and the non-canonical p-1, p, p+1; plus 0 and 1
# with the top bit set, which X25519 ignores.
LOW_ORDER = {
    "0": bytes(32),
    "1": (1).to_bytes(32, "little"),
    "order-8 a": bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    "order-8 b": bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    "p-1": (P - 1).to_bytes(32, "little"),
    "p": P.to_bytes(32, "little"),
    "p+1": (P + 1).to_bytes(32, "little"),
    "0, top bit": (2**255).to_bytes(32, "little"),
    "1, top bit": (2**255 + 1).to_bytes(32, "little"),
}


@pytest.mark.parametrize("point", LOW_ORDER.values(), ids=LOW_ORDER.keys())
def test_cryptography_refuses_the_all_zero_secret_of_every_small_order_point(point: bytes) -> None:
    # the library behaviour check_public_key and shared_key rely on: OpenSSL's X25519 refuses a zero secret
    with pytest.raises(ValueError, match="shared key"):
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(point))


@pytest.mark.parametrize("point", LOW_ORDER.values(), ids=LOW_ORDER.keys())
def test_a_small_order_public_key_is_refused_by_the_key_check(point: bytes) -> None:
    with pytest.raises(SecAggError, match="client 7's mask key is a low-order X25519 point"):
        check_public_key(point, "client 7's mask key")


@pytest.mark.parametrize(
    ("key", "needle"),
    [(bytes(31), "must be 32 bytes, got 31"), (bytes(33), "must be 32 bytes, got 33"), ("k" * 32, "must be bytes")],
)
def test_a_malformed_public_key_is_refused_by_the_key_check(key: object, needle: str) -> None:
    with pytest.raises(SecAggError, match=f"client 7's mask key {needle}"):
        check_public_key(key, "client 7's mask key")


def test_the_key_check_passes_a_fresh_public_key() -> None:
    public = generate_keypair().public
    assert check_public_key(public, "client 7's mask key") == public


def test_seal_opens_with_a_reference_aes_gcm_and_uses_a_fresh_nonce() -> None:
    # Prepare
    key = AESGCM.generate_key(bit_length=256)
    # Execute
    blobs = [seal(key, b"share bytes", aad()) for _ in range(50)]
    # Assert
    assert len({blob[:NONCE_BYTES] for blob in blobs}) == 50
    for blob in blobs:
        assert AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad()) == b"share bytes"
        assert open_(key, blob, aad()) == b"share bytes"


def test_any_flipped_bit_is_rejected() -> None:
    key = AESGCM.generate_key(bit_length=256)
    blob = seal(key, b"0123456789abcdef", aad())
    for byte in range(len(blob)):
        for bit in (0, 7):
            tampered = bytearray(blob)
            tampered[byte] ^= 1 << bit
            with pytest.raises(SecAggError, match="authentication"):
                open_(key, bytes(tampered), aad())


@pytest.mark.parametrize(
    "other",
    [aad(round_id=4), aad(recipient=23), aad(sender=12), aad(stage="unmask"), b""],
    ids=["other-round", "other-recipient", "other-sender", "other-stage", "no-aad"],
)
def test_a_replay_under_other_associated_data_is_rejected(other: bytes) -> None:
    key = AESGCM.generate_key(bit_length=256)
    blob = seal(key, b"share", aad())
    with pytest.raises(SecAggError, match="another round, stage or recipient"):
        open_(key, blob, other)


def test_a_truncated_blob_or_wrong_key_is_rejected() -> None:
    key = AESGCM.generate_key(bit_length=256)
    blob = seal(key, b"share", aad())
    with pytest.raises(SecAggError, match="too short"):
        open_(key, blob[:20], aad())
    with pytest.raises(SecAggError):
        open_(AESGCM.generate_key(bit_length=256), blob, aad())
