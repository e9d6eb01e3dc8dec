"""The four SecAgg+ stages as plain functions: what a client computes, and what the server does with it.

Bell et al. 2020 (https://eprint.iacr.org/2020/704), Algorithm 2, on the rounds of Bonawitz et al.
2017 (https://eprint.iacr.org/2017/281), Figure 4:

0. advertise keys: each sampled client publishes an encryption and a mask public key (fresh per round);
1. share keys: each client splits a fresh self-mask seed b_i and its mask secret key among its share
   holders (its neighbours that advertised, and itself) and sends each neighbour its shares, encrypted;
   the clients that send shares form U2, and the server relays each ciphertext to its recipient;
2. masked input: each client masks its quantized input with b_i and with every neighbour in U2 (those
   whose shares it received); the clients whose masked input arrives form U3, the survivors;
3. unmask: each client reveals, for every owner it holds shares of, the seed share if the owner is in U3
   or the key share if it is in U2 but not U3, and never both; the server rebuilds the secrets and
   removes the masks from the sum of the survivors' masked inputs.

Who talks to whom, retries and timeouts belong to the Flower workflow; this module only computes.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedtune.privacy.secagg import crypto, shares
from fedtune.privacy.secagg.errors import SecAggError, TooFewSurvivors
from fedtune.privacy.secagg.masking import mask, pair_mask_keys, unmask

SHARE_STAGE = "share-keys"


@dataclass(frozen=True)
class PublicKeys:
    """What a client advertises in stage 0: its encryption and mask public keys (raw X25519)."""

    encryption: bytes
    mask: bytes


def checked_publics(node: int, encryption: object, mask: object) -> PublicKeys:
    """Client ``node``'s advertised keys, if both are usable X25519 public keys (``crypto.check_public_key``);
    else ``SecAggError`` naming the node. The server checks them as they arrive, each client again
    before it agrees a key with a neighbour."""
    return PublicKeys(
        crypto.check_public_key(encryption, f"client {node}'s encryption public key"),
        crypto.check_public_key(mask, f"client {node}'s mask public key"),
    )


@dataclass(frozen=True)
class ClientKeys:
    """A client's two key pairs for one round; only ``mask.private`` is ever secret-shared."""

    encryption: crypto.KeyPair
    mask: crypto.KeyPair

    def public(self) -> PublicKeys:
        return PublicKeys(self.encryption.public, self.mask.public)


@dataclass(frozen=True)
class HeldShares:
    """The shares a holder keeps of one owner's self-mask seed and mask secret key."""

    seed: bytes
    key: bytes


def advertise_keys() -> ClientKeys:
    """Stage 0: two fresh X25519 key pairs for this round."""
    return ClientKeys(crypto.generate_keypair(), crypto.generate_keypair())


def _encryption_key(keys: ClientKeys, peer: PublicKeys, my_id: int, peer_id: int, round_id: int) -> bytes:
    info = crypto.ENCRYPTION_INFO
    return crypto.shared_key(
        keys.encryption.private, peer.encryption, info=info, round_id=round_id, my_id=my_id, peer_id=peer_id
    )


def check_threshold(my_id: int, holders: int, threshold: int) -> None:
    """``SecAggError`` unless ``threshold`` is a strict majority of ``holders``: holders / 2 < t <= holders."""
    if not holders / 2 < threshold <= holders:
        raise SecAggError(
            f"client {my_id} refuses threshold {threshold} for its {holders} share holders: it must be a strict "
            f"majority, in {holders // 2 + 1}..{holders}, or the server could rebuild both secrets of one client."
        )


def share_keys(
    my_id: int, keys: ClientKeys, peers: Mapping[int, PublicKeys], threshold: int, round_id: int
) -> tuple[bytes, HeldShares, dict[int, bytes]]:
    """Stage 1: a fresh self-mask seed, the shares the client keeps, and a ciphertext for each neighbour.

    ``peers``: the public keys of the neighbours that advertised. Raises ``SecAggError`` unless
    ``threshold`` is a strict majority of the share holders (the neighbours and the client), the
    condition under which a server cannot collect both the seed and the key shares of one client
    (``graph``), or when a neighbour's key is unusable (naming the neighbour).
    """
    holders = sorted({*peers, my_id})
    check_threshold(my_id, len(holders), threshold)
    for peer, public in peers.items():
        checked_publics(peer, public.encryption, public.mask)
    seed = os.urandom(shares.SECRET_BYTES)
    seed_shares = shares.split(seed, holders, threshold)
    key_shares = shares.split(keys.mask.private, holders, threshold)
    out = {}
    for peer, public in peers.items():
        aad = crypto.message_aad(round_id=round_id, stage=SHARE_STAGE, sender=my_id, recipient=peer)
        enc = _encryption_key(keys, public, my_id, peer, round_id)
        out[peer] = crypto.seal(enc, seed_shares[peer] + key_shares[peer], aad)
    return seed, HeldShares(seed_shares[my_id], key_shares[my_id]), out


def receive_shares(
    my_id: int, keys: ClientKeys, peers: Mapping[int, PublicKeys], ciphertexts: Mapping[int, bytes], round_id: int
) -> dict[int, HeldShares]:
    """Stage 2, first half: decrypt the shares each neighbour sent; the senders are this client's U2 neighbours.

    Raises ``SecAggError`` for a sender that is not a neighbour, or a ciphertext that fails authentication.
    """
    held = {}
    for sender, blob in ciphertexts.items():
        if sender not in peers:
            raise SecAggError(f"client {my_id} got shares from {sender}, which is not one of its neighbours.")
        aad = crypto.message_aad(round_id=round_id, stage=SHARE_STAGE, sender=sender, recipient=my_id)
        plain = crypto.open_(_encryption_key(keys, peers[sender], my_id, sender, round_id), blob, aad)
        if len(plain) != 2 * shares.SHARE_BYTES:
            raise SecAggError(f"shares from client {sender} have {len(plain)} bytes, not {2 * shares.SHARE_BYTES}.")
        held[sender] = HeldShares(plain[: shares.SHARE_BYTES], plain[shares.SHARE_BYTES :])
    return held


def masked_input(
    my_id: int,
    quantized: np.ndarray,
    seed: bytes,
    keys: ClientKeys,
    peers: Mapping[int, PublicKeys],
    bits: int,
    round_id: int,
    context: bytes,
) -> np.ndarray:
    """Stage 2, second half: ``quantized`` (uint, (L,)) masked with the seed and with each U2 neighbour in ``peers``."""
    pair_keys = pair_mask_keys(my_id, keys.mask.private, {j: p.mask for j, p in peers.items()}, round_id)
    return mask(quantized, seed, pair_keys, my_id, bits, context)


def unmask_reply(
    my_id: int, held: Mapping[int, HeldShares], survivors: Collection[int], dropped: Collection[int], threshold: int
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Stage 3, client side: (seed shares of survivors, key shares of dropped clients), by owner id.

    ``held`` includes the client's own shares under ``my_id``. Refuses (``SecAggError``) a request that
    names a client both survivor and dropped or names this client dropped, and (``TooFewSurvivors``)
    one with fewer survivors than the threshold, since answering it could only help a cheating server.
    """
    survivors, dropped = set(survivors), set(dropped)
    if survivors & dropped:
        raise SecAggError(f"clients {sorted(survivors & dropped)} are listed as both survivors and dropped.")
    if my_id not in survivors:
        raise SecAggError(f"client {my_id} is asked to unmask but is not listed as a survivor.")
    if len(survivors) < threshold:
        raise TooFewSurvivors(f"{len(survivors)} survivors are fewer than the threshold {threshold}; round abandoned.")
    seeds = {owner: h.seed for owner, h in held.items() if owner in survivors}
    keys = {owner: h.key for owner, h in held.items() if owner in dropped and owner != my_id}
    return seeds, keys


def unmask_sum(
    masked_sum: np.ndarray,
    replies: Iterable[tuple[Mapping[int, bytes], Mapping[int, bytes]]],
    survivors: Collection[int],
    dropped_neighbours: Mapping[int, Collection[int]],
    mask_publics: Mapping[int, bytes],
    bits: int,
    round_id: int,
    context: bytes,
    threshold: int,
) -> np.ndarray:
    """Stage 3, server side: the sum of the survivors' quantized inputs (uint32, mod 2^bits).

    ``masked_sum``: ``masking.add`` of the survivors' masked inputs. ``replies``: the ``unmask_reply``
    of every holder that answered. ``dropped_neighbours[j]``: the survivors that masked with dropped
    client j (its neighbours in U3 that received its shares). ``threshold``: the round's t, which every
    share must carry. Raises ``TooFewSurvivors`` when some secret has fewer than t shares (the round is
    abandoned and nothing is returned), and ``SecAggError`` when a share is corrupt or forged.
    """
    seed_shares: dict[int, list[bytes]] = {}
    key_shares: dict[int, list[bytes]] = {}
    for seeds, keys in replies:
        for owner, share in seeds.items():
            seed_shares.setdefault(owner, []).append(share)
        for owner, share in keys.items():
            key_shares.setdefault(owner, []).append(share)
    survivor_seeds = {i: _rebuild(seed_shares.get(i, []), threshold, i, "self-mask seed") for i in survivors}
    dropped_keys = {}
    for j, masked_with in dropped_neighbours.items():
        if not masked_with:
            continue
        secret = _rebuild(key_shares.get(j, []), threshold, j, "mask key")
        dropped_keys[j] = pair_mask_keys(j, secret, {i: mask_publics[i] for i in masked_with}, round_id)
    return unmask(masked_sum, survivor_seeds, dropped_keys, bits, context)


def _rebuild(share_list: list[bytes], threshold: int, owner: int, what: str) -> bytes:
    try:
        return shares.combine(share_list, threshold)
    except TooFewSurvivors as e:
        raise TooFewSurvivors(f"cannot rebuild the {what} of client {owner}: {e}") from e
    except SecAggError as e:
        raise SecAggError(f"cannot rebuild the {what} of client {owner}: {e}") from e
