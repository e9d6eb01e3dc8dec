"""SecAgg+ end to end, in memory: all four stages for N clients with dropouts, against plain numpy sums."""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import numpy as np
import pytest

from fedtune.privacy.secagg.errors import SecAggError, TooFewSurvivors
from fedtune.privacy.secagg.graph import default_threshold, effective_degree, neighbours
from fedtune.privacy.secagg.masking import add, round_context
from fedtune.privacy.secagg.quantize import Quantizer, modulus_bits
from fedtune.privacy.secagg.stages import (
    HeldShares,
    advertise_keys,
    masked_input,
    receive_shares,
    share_keys,
    unmask_reply,
    unmask_sum,
)

RUN = b"test-run"


@dataclass
class Outcome:
    total: np.ndarray  # unmasked sum, uint32 (L,)
    survivors: set[int]  # U3: whose masked input is in the sum
    wire: list[np.ndarray]  # the masked inputs as sent


def simulate_round(
    inputs: Mapping[int, np.ndarray],
    degree: int,
    threshold: int,
    bits: int,
    round_id: int = 1,
    before_share: Collection[int] = (),
    before_mask: Collection[int] = (),
    before_unmask: Collection[int] = (),
) -> Outcome:
    """Run the four stages with the package's functions; a client in a ``before_*`` set stops answering there."""
    ids = sorted(inputs)
    graph = neighbours(ids, degree, random.Random(round_id))
    context = round_context(round_id, RUN)
    # Stage 0: everyone advertises two fresh public keys.
    keys = {i: advertise_keys() for i in ids}
    publics = {i: keys[i].public() for i in ids}
    # Stage 1: clients send encrypted shares; the server relays each ciphertext to its recipient.
    seeds, held, inbox = {}, {}, {i: {} for i in ids}
    for i in ids:
        if i in before_share:
            continue
        seeds[i], own, outbox = share_keys(i, keys[i], {j: publics[j] for j in graph[i]}, threshold, round_id)
        held[i] = {i: own}
        for j, blob in outbox.items():
            inbox[j][i] = blob
    u2 = set(seeds)
    # Stage 2: clients in U2 decrypt their shares and mask with the neighbours that sent them some.
    masked = {}
    for j in sorted(u2):
        held[j] |= receive_shares(j, keys[j], {i: publics[i] for i in graph[j]}, inbox[j], round_id)
        if j not in before_mask:
            peers = {i: publics[i] for i in inbox[j]}  # the neighbours in U2
            masked[j] = masked_input(j, inputs[j], seeds[j], keys[j], peers, bits, round_id, context)
    u3 = set(masked)
    dropped = u2 - u3
    # Stage 3: the server sums, the answering survivors reveal shares, the server unmasks.
    total = add((masked[i] for i in sorted(u3)), bits)
    replies = [unmask_reply(i, held[i], u3, dropped, threshold) for i in sorted(u3 - set(before_unmask))]
    masked_with = {j: graph[j] & u3 for j in dropped}
    mask_publics = {i: publics[i].mask for i in ids}
    result = unmask_sum(total, replies, u3, masked_with, mask_publics, bits, round_id, context, threshold)
    return Outcome(result, u3, list(masked.values()))


def quantized_inputs(n: int, length: int, bits: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {10 * i + 3: rng.integers(0, 2**bits, size=length, dtype=np.uint32) for i in range(n)}


def plain_sum(inputs: Mapping[int, np.ndarray], who: Collection[int]) -> np.ndarray:
    return np.sum([inputs[i].astype(np.int64) for i in who], axis=0)


def test_unmasked_sum_is_exact_and_the_dequantized_mean_within_one_step() -> None:
    # Prepare: float deltas, quantized on each client
    n, length, clip, qbits = 5, 2000, 0.05, 14
    rng = np.random.default_rng(0)
    floats = {10 * i + 3: rng.normal(0, 0.03, size=length).astype(np.float32) for i in range(n)}
    q = Quantizer(clip=clip, bits=qbits)
    ints = {i: q.quantize(x, rng) for i, x in floats.items()}
    bits = modulus_bits(n, qbits)
    # Execute
    out = simulate_round(ints, degree=4, threshold=default_threshold(4), bits=bits)
    # Assert
    np.testing.assert_array_equal(out.total, plain_sum(ints, ints))
    reference = np.mean([np.clip(x.astype(np.float64), -clip, clip) for x in floats.values()], axis=0)
    assert np.max(np.abs(q.dequantize_mean(out.total, n) - reference)) <= q.mean_error_bound()


def test_masked_inputs_travel_as_uint32_and_look_nothing_like_the_inputs() -> None:
    inputs = quantized_inputs(4, 1000, 8)
    out = simulate_round(inputs, degree=3, threshold=3, bits=modulus_bits(4, 8))
    assert all(v.dtype == np.uint32 and v.shape == (1000,) for v in out.wire)
    assert out.total.dtype == np.uint32
    assert all(int(v.max()) >= 2**8 for v in out.wire)  # masks fill all b = 10 bits, inputs only 8


N, DEGREE = 7, 6  # complete graph: 7 holders per secret
T = default_threshold(DEGREE)  # 4, so up to N - T = 3 clients may drop


@pytest.mark.parametrize("drops", range(1, N - T + 1))
@pytest.mark.parametrize("stage", ["before_share", "before_mask", "before_unmask", "mixed"])
def test_up_to_n_minus_t_dropouts_leave_the_survivors_sum(drops: int, stage: str) -> None:
    # Prepare
    inputs = quantized_inputs(N, 300, 12, seed=drops)
    ids = sorted(inputs)
    gone = ids[1 : 1 + drops] if stage != "mixed" else ids[-drops:]
    when = {"before_share": set(), "before_mask": set(), "before_unmask": set()}
    if stage == "mixed":
        for k, i in enumerate(gone):
            when[["before_share", "before_mask", "before_unmask"][k % 3]].add(i)
    else:
        when[stage] = set(gone)
    # Execute
    out = simulate_round(inputs, DEGREE, T, modulus_bits(N, 12), **when)
    # Assert: a client that dropped after sending its masked input is still in the sum
    expected_survivors = set(ids) - when["before_share"] - when["before_mask"]
    assert out.survivors == expected_survivors
    np.testing.assert_array_equal(out.total, plain_sum(inputs, expected_survivors))


def test_dropouts_in_a_sparse_graph() -> None:
    # Prepare: 12 clients, 4 neighbours each, 5 holders and t = 3, so any 2 may drop
    inputs = quantized_inputs(12, 200, 10)
    ids = sorted(inputs)
    assert effective_degree(12, 4) == 4
    # Execute
    out = simulate_round(inputs, 4, 3, modulus_bits(12, 10), before_mask=[ids[0]], before_unmask=[ids[5]])
    # Assert
    np.testing.assert_array_equal(out.total, plain_sum(inputs, set(ids) - {ids[0]}))


@pytest.mark.parametrize("stage", ["before_mask", "before_unmask"])
def test_fewer_than_t_survivors_abandon_the_round(stage: str) -> None:
    inputs = quantized_inputs(N, 100, 8)
    gone = sorted(inputs)[: N - T + 1]
    with pytest.raises(TooFewSurvivors):
        simulate_round(inputs, DEGREE, T, modulus_bits(N, 8), **{stage: gone})


def test_the_server_cannot_unmask_with_fewer_than_t_replies() -> None:
    # Prepare: a full round's state, replies from only T-1 holders (bypassing the clients' own check)
    t, bits = 3, 10
    ids, ctx = [1, 2, 3, 4, 5], round_context(9, RUN)
    keys = {i: advertise_keys() for i in ids}
    pub = {i: keys[i].public() for i in ids}
    held: dict[int, dict[int, HeldShares]] = {i: {} for i in ids}
    seeds = {}
    for i in ids:
        seeds[i], held[i][i], outbox = share_keys(i, keys[i], {j: pub[j] for j in ids if j != i}, t, 9)
        for j, blob in outbox.items():
            held[j] |= receive_shares(j, keys[j], {i: pub[i]}, {i: blob}, 9)
    x = np.zeros(50, np.uint32)
    ys = [masked_input(i, x, seeds[i], keys[i], {j: pub[j] for j in ids if j != i}, bits, 9, ctx) for i in ids]
    replies = [unmask_reply(i, held[i], ids, [], t) for i in ids[: t - 1]]
    # Execute / Assert
    with pytest.raises(TooFewSurvivors, match="self-mask seed"):
        unmask_sum(add(ys, bits), replies, ids, {}, {i: pub[i].mask for i in ids}, bits, 9, ctx, t)


@pytest.mark.parametrize(("holders", "threshold"), [(5, 1), (5, 2), (4, 2), (5, 6), (2, 1)])
def test_a_client_refuses_a_threshold_that_is_not_a_strict_majority_of_its_holders(
    holders: int, threshold: int
) -> None:
    # Prepare: with 2t <= holders, a server that lies about who dropped gets both secrets of one client
    keys = {i: advertise_keys() for i in range(1, holders + 1)}
    peers = {j: keys[j].public() for j in keys if j != 1}
    # Execute / Assert
    with pytest.raises(
        SecAggError, match=f"threshold {threshold} for its {holders} share holders: it must be a strict"
    ):
        share_keys(1, keys[1], peers, threshold, round_id=4)


@pytest.mark.parametrize(("holders", "threshold"), [(5, 3), (5, 4), (5, 5), (4, 3), (2, 2)])
def test_a_client_accepts_a_strict_majority_of_its_holders(holders: int, threshold: int) -> None:
    keys = {i: advertise_keys() for i in range(1, holders + 1)}
    peers = {j: keys[j].public() for j in keys if j != 1}
    _, _, outbox = share_keys(1, keys[1], peers, threshold, round_id=4)
    assert set(outbox) == set(peers)


@pytest.mark.parametrize("which", ["encryption", "mask"])
def test_a_client_refuses_a_low_order_neighbour_key_before_sharing_naming_the_neighbour(which: str) -> None:
    keys = {i: advertise_keys() for i in (1, 2, 3)}
    peers = {j: keys[j].public() for j in (2, 3)}
    peers[3] = replace(peers[3], **{which: bytes(32)})
    with pytest.raises(SecAggError, match=f"client 3's {which} public key is a low-order X25519 point"):
        share_keys(1, keys[1], peers, 2, round_id=4)


def test_a_client_refuses_contradictory_unmask_requests() -> None:
    with pytest.raises(SecAggError, match="both survivors and dropped"):
        unmask_reply(1, {}, [1, 2, 3], [3], 2)
    with pytest.raises(SecAggError, match="not listed as a survivor"):
        unmask_reply(1, {}, [2, 3], [1], 2)


def test_a_share_replayed_to_another_recipient_or_round_is_rejected() -> None:
    # Prepare
    keys = {i: advertise_keys() for i in (1, 2, 3)}
    pub = {i: keys[i].public() for i in keys}
    _, _, outbox = share_keys(1, keys[1], {2: pub[2], 3: pub[3]}, 2, round_id=4)
    # Execute / Assert: the right recipient in the right round opens it
    assert set(receive_shares(2, keys[2], {1: pub[1]}, {1: outbox[2]}, 4)) == {1}
    with pytest.raises(SecAggError, match="authentication"):
        receive_shares(3, keys[3], {1: pub[1]}, {1: outbox[2]}, 4)  # other recipient
    with pytest.raises(SecAggError, match="authentication"):
        receive_shares(2, keys[2], {1: pub[1]}, {1: outbox[2]}, 5)  # other round
    tampered = bytearray(outbox[2])
    tampered[-1] ^= 0x80
    with pytest.raises(SecAggError, match="authentication"):
        receive_shares(2, keys[2], {1: pub[1]}, {1: bytes(tampered)}, 4)
    with pytest.raises(SecAggError, match="not one of its neighbours"):
        receive_shares(2, keys[2], {3: pub[3]}, {1: outbox[2]}, 4)


def test_the_same_inputs_are_masked_differently_every_round() -> None:
    inputs = quantized_inputs(4, 500, 8)
    first = simulate_round(inputs, 3, 3, 10, round_id=1)
    second = simulate_round(inputs, 3, 3, 10, round_id=2)
    np.testing.assert_array_equal(first.total, second.total)
    assert not any(np.array_equal(a, b) for a in first.wire for b in second.wire)
