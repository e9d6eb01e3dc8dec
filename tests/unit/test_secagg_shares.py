"""Shamir shares of 32-byte secrets: any t rebuild the secret, fewer raise, tampering is caught."""

from __future__ import annotations

import itertools
import os

import pytest

from fedtune.privacy.secagg.errors import SecAggError, TooFewSurvivors
from fedtune.privacy.secagg.shares import SHARE_BYTES, combine, split

HOLDERS = [40, 7, 19, 3, 88]


def test_every_subset_of_t_or_more_shares_rebuilds_the_secret() -> None:
    # Prepare
    secret = os.urandom(32)
    # Execute
    shares = split(secret, HOLDERS, threshold=3)
    # Assert
    assert set(shares) == set(HOLDERS) and all(len(s) == SHARE_BYTES for s in shares.values())
    for size in (3, 4, 5):
        for subset in itertools.combinations(HOLDERS, size):
            assert combine((shares[h] for h in subset), 3) == secret


def test_share_index_is_the_recipients_one_based_position() -> None:
    shares = split(os.urandom(32), HOLDERS, threshold=2)
    for position, holder in enumerate(HOLDERS, start=1):
        assert int.from_bytes(shares[holder][:2], "big") == position


@pytest.mark.parametrize("given", [0, 1, 2])
def test_fewer_than_t_shares_raise_instead_of_returning_garbage(given: int) -> None:
    shares = split(os.urandom(32), HOLDERS, threshold=3)
    with pytest.raises(TooFewSurvivors):
        combine([shares[h] for h in HOLDERS[:given]], 3)


def test_a_repeated_share_counts_once() -> None:
    shares = split(os.urandom(32), HOLDERS, threshold=3)
    with pytest.raises(TooFewSurvivors, match="2 shares"):
        combine([shares[40], shares[7], shares[7]], 3)


def test_a_share_claiming_a_lower_threshold_is_caught_by_the_commitment() -> None:
    # Prepare: forge the threshold field, so pycryptodome interpolates from too few points (and the
    # round's threshold is misstated to match, so only the commitment stands in the way)
    secret = os.urandom(32)
    shares = split(secret, HOLDERS, threshold=3)
    forged = [s[:2] + (2).to_bytes(2, "big") + s[4:] for s in (shares[40], shares[7])]
    # Execute / Assert
    with pytest.raises(SecAggError, match="commitment"):
        combine(forged, 2)


def test_a_lone_share_forged_with_threshold_1_cannot_choose_the_secret() -> None:
    # Prepare: holder 40 replaces its share of a t = 3 secret by a one-point "polynomial" of a secret it
    # chose; trusting the share's own threshold field, that one share rebuilds the chosen secret
    shares = split(os.urandom(32), HOLDERS, threshold=3)
    chosen = os.urandom(32)
    forged = split(chosen, [40], threshold=1)[40]
    assert combine([forged], 1) == chosen
    # Execute / Assert: against the round's t = 3 it is refused, alone or among honest shares
    with pytest.raises(SecAggError, match="share 1 claims threshold 1, but the round's is 3"):
        combine([forged], 3)
    with pytest.raises(SecAggError, match="claims threshold 1"):
        combine([shares[19], forged, shares[7], shares[3]], 3)


@pytest.mark.parametrize("claimed", [2, 4])
def test_honest_shares_of_another_threshold_are_refused(claimed: int) -> None:
    shares = split(os.urandom(32), HOLDERS, threshold=claimed)
    with pytest.raises(SecAggError, match=f"claims threshold {claimed}, but the round's is 3"):
        combine(list(shares.values()), 3)


@pytest.mark.parametrize("byte", [4, 19, 20, 35])
def test_a_corrupted_share_is_caught_by_the_commitment(byte: int) -> None:
    secret = os.urandom(32)
    shares = split(secret, HOLDERS, threshold=3)
    bad = bytearray(shares[19])
    bad[byte] ^= 0x01
    with pytest.raises(SecAggError, match="commitment"):
        combine([shares[40], shares[7], bytes(bad)], 3)


def test_shares_of_two_secrets_do_not_mix() -> None:
    a = split(os.urandom(32), HOLDERS, threshold=2)
    b = split(os.urandom(32), HOLDERS, threshold=2)
    with pytest.raises(SecAggError, match="disagree"):
        combine([a[40], b[7]], 2)


@pytest.mark.parametrize(
    ("secret", "holders", "threshold", "match"),
    [(bytes(16), HOLDERS, 2, "32 bytes"), (bytes(32), [1, 1, 2], 2, "distinct"), (bytes(32), HOLDERS, 6, "threshold")],
)
def test_split_refuses_bad_input(secret: bytes, holders: list[int], threshold: int, match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        split(secret, holders, threshold)
