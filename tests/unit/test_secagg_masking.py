"""SecAgg+ masks: ChaCha20 expansion, pairwise cancellation, unmasking against plain numpy, uniformity, freshness."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy.stats import chisquare

from fedtune.privacy.secagg import masking
from fedtune.privacy.secagg.errors import SecAggError
from fedtune.privacy.secagg.masking import add, expand, mask, round_context, unmask
from fedtune.privacy.secagg.quantize import wire_dtype

CTX = round_context(1, b"run-a")


def seed(n: int) -> bytes:
    return bytes([n]) * 32


def test_expand_is_the_chacha20_keystream_masked_to_b_bits() -> None:
    # Prepare: the reference keystream straight from `cryptography`, with the documented nonce
    nonce = bytes(4) + hashlib.sha256(b"fedtune/secagg+/v1/nonce" + CTX).digest()[:12]
    stream = Cipher(algorithms.ChaCha20(seed(1), nonce), mode=None).encryptor().update(bytes(4 * 1000))
    reference = np.frombuffer(stream, dtype="<u4") % (1 << 13)
    # Execute
    out = expand(seed(1), 1000, 13, CTX)
    # Assert
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, reference)


def test_masks_change_with_the_round_the_run_and_the_seed() -> None:
    masks = [
        expand(seed(1), 64, 32, round_context(1, b"run-a")),
        expand(seed(1), 64, 32, round_context(2, b"run-a")),
        expand(seed(1), 64, 32, round_context(1, b"run-b")),
        expand(seed(2), 64, 32, round_context(1, b"run-a")),
    ]
    assert len({m.tobytes() for m in masks}) == len(masks)


@pytest.mark.parametrize("bits", [13, 16, 32])
def test_a_single_masked_vector_is_uniform(bits: int) -> None:
    # Prepare: a very non-uniform input (all zeros but one constant run)
    x = np.zeros(2**16, dtype=np.uint32)
    x[:1000] = 5
    # Execute
    y = mask(x, seed(7), {3: seed(8), 12: seed(9)}, my_id=5, bits=bits, context=CTX)
    # Assert: the top 8 of the b bits fall evenly into 256 bins
    counts = np.bincount(y >> (bits - 8), minlength=256)
    assert len(counts) == 256
    assert chisquare(counts).pvalue > 1e-3


def test_pairwise_masks_cancel_and_self_masks_come_off() -> None:
    # Prepare: three clients, all pairs linked, pair seed s_ij shared by i and j
    bits, length = 20, 500
    rng = np.random.default_rng(0)
    xs = {i: rng.integers(0, 2**16, size=length, dtype=np.uint32) for i in (1, 2, 3)}
    pair = {(1, 2): seed(12), (1, 3): seed(13), (2, 3): seed(23)}
    keys = {i: {j: pair[tuple(sorted((i, j)))] for j in xs if j != i} for i in xs}
    # Execute
    total = add((mask(xs[i], seed(i), keys[i], i, bits, CTX) for i in xs), bits)
    out = unmask(total, {i: seed(i) for i in xs}, {}, bits, CTX)
    # Assert
    np.testing.assert_array_equal(out, sum(x.astype(np.int64) for x in xs.values()))


@pytest.mark.parametrize("dropped", [1, 2, 3])
def test_a_dropped_clients_pairwise_masks_are_removed(dropped: int) -> None:
    # Prepare: as above, one client never sends its masked input
    bits, length = 32, 300
    rng = np.random.default_rng(dropped)
    xs = {i: rng.integers(0, 2**30, size=length, dtype=np.uint32) for i in (1, 2, 3)}
    pair = {(1, 2): seed(12), (1, 3): seed(13), (2, 3): seed(23)}
    keys = {i: {j: pair[tuple(sorted((i, j)))] for j in xs if j != i} for i in xs}
    survivors = [i for i in xs if i != dropped]
    # Execute
    total = add((mask(xs[i], seed(i), keys[i], i, bits, CTX) for i in survivors), bits)
    out = unmask(total, {i: seed(i) for i in survivors}, {dropped: {i: keys[dropped][i] for i in survivors}}, bits, CTX)
    # Assert
    np.testing.assert_array_equal(out, sum(xs[i].astype(np.int64) for i in survivors))


def test_arithmetic_wraps_modulo_2_to_the_b() -> None:
    vectors = [np.full(4, 2**12 - 1, np.uint32), np.full(4, 2**12 - 1, np.uint32), np.arange(4, dtype=np.uint32)]
    reference = np.sum([v.astype(np.int64) for v in vectors], axis=0) % 2**12
    np.testing.assert_array_equal(add(vectors, 12), reference)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.zeros(4, np.float32), "unsigned"),
        (np.zeros((2, 2), np.uint32), "1-D"),
        (np.zeros(4, np.uint64), "at most 32 bits"),
        (np.full(4, 2**12, np.uint32), "more than 12 bits"),
    ],
)
def test_mask_refuses_input_that_does_not_fit(values: np.ndarray, match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        mask(values, seed(1), {}, 1, 12, CTX)


def test_mask_refuses_itself_as_a_neighbour_and_short_seeds() -> None:
    with pytest.raises(SecAggError, match="itself"):
        mask(np.zeros(4, np.uint32), seed(1), {1: seed(2)}, 1, 12, CTX)
    with pytest.raises(SecAggError, match="32 bytes"):
        expand(b"short", 4, 12, CTX)


@pytest.mark.parametrize("bits", [8, 16])
def test_narrow_wire_dtypes_sum_and_unmask_like_uint32(bits: int) -> None:
    # Prepare: masked vectors cast to the smallest wire dtype before "sending"
    rng = np.random.default_rng(bits)
    xs = {i: rng.integers(0, 2 ** (bits - 2), size=400, dtype=np.uint32) for i in (1, 2, 3)}
    keys = {1: {2: seed(12)}, 2: {1: seed(12)}, 3: {}}
    wire = [mask(xs[i], seed(i), keys[i], i, bits, CTX).astype(wire_dtype(bits)) for i in xs]
    # Execute
    out = unmask(add(wire, bits), {i: seed(i) for i in xs}, {}, bits, CTX)
    # Assert
    assert all(v.dtype.itemsize == bits // 8 for v in wire)
    np.testing.assert_array_equal(out, np.sum([x.astype(np.int64) for x in xs.values()], axis=0))


def reference_stream(key: bytes, length: int, bits: int) -> np.ndarray:
    """One whole mask stream, computed the straightforward way: the full ChaCha20 keystream at once, mod 2^b."""
    nonce = bytes(4) + hashlib.sha256(b"fedtune/secagg+/v1/nonce" + CTX).digest()[:12]
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.int64) % (1 << bits)


@pytest.mark.parametrize("bits", [13, 20, 32])
def test_chunked_masking_equals_the_stream_by_stream_reference(bits: int) -> None:
    # Prepare: a vector spanning 2.5 of the chunks the streams are expanded in; client 5 has neighbours
    # on both sides (+ towards 7 and 9, - towards 2)
    length = int(2.5 * masking._CHUNK)
    x = np.random.default_rng(bits).integers(0, 1 << (bits - 1), size=length, dtype=np.uint32)
    pairs = {2: seed(25), 7: seed(57), 9: seed(59)}
    expected = x.astype(np.int64) + reference_stream(seed(5), length, bits) - reference_stream(seed(25), length, bits)
    expected += reference_stream(seed(57), length, bits) + reference_stream(seed(59), length, bits)

    # Execute: mask; then unmask as if 5 alone survived and 2, 7 and 9 dropped
    masked = mask(x, seed(5), pairs, 5, bits, CTX)
    unmasked = unmask(masked, {5: seed(5)}, {j: {5: key} for j, key in pairs.items()}, bits, CTX)

    # Assert
    np.testing.assert_array_equal(masked, expected % (1 << bits))
    np.testing.assert_array_equal(unmasked, x)
    np.testing.assert_array_equal(expand(seed(5), length, bits, CTX), reference_stream(seed(5), length, bits))
