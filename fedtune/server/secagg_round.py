"""One SecAgg+ round on the Message API (``secagg.protocol = secagg``): the server learns only the sum.

Bell et al. 2020 (https://eprint.iacr.org/2020/704), Algorithm 2, as four message exchanges with the
sampled clients, each under a timeout; the pure stage functions live in ``fedtune.privacy.secagg``:

1. ``query.secagg_keys``: each client advertises two fresh public keys, its number of examples and its
   LoRA rank (all public); the answering clients are U1, and the masking graph is laid over them;
2. ``query.secagg_share``: each client gets its neighbours' public keys and answers one ciphertext per
   neighbour (its Shamir shares); the answering clients are U2;
3. ``train.secagg``: each client in U2 gets the global adapter, the round spec, the ciphertexts
   addressed to it and its weight alpha_i = w_i / max_j w_j (w: examples or 1); it trains and answers
   alpha_i * delta_i, zero-padded to the global rank, flat, quantized and masked; the answering clients
   are U3, and only the running sum of their vectors is kept;
4. ``query.secagg_unmask``: each client in U3 learns U3 and U2 - U3 and answers seed shares of U3 and
   key shares of U2 - U3; the server removes the masks, dequantizes and divides by sum alpha_i (per
   entry, over the sites whose rank covers it), then takes the strategy's server step. That division
   shows each rank band's sum on its own, so under mixed ranks the round is abandoned before this stage
   (and before stage 3) when some band is trained by fewer than t of the sites (``covered``).

Under ``privacy.mechanism = distributed`` stage 3 answers the clipped delta as integers plus a Skellam
noise share (``fedtune.privacy.distributed``) in a modulus wide enough for the noise; the server decodes
the signed sum, divides it by the expected number of clients and records the noise the survivors added.

A round that cannot finish (too few clients at some stage, a corrupt share) is abandoned: nothing is
released and the global adapter stays as it was; the round's record says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.config import RunConfig
from fedtune.core.errors import ConfigError
from fedtune.model.lora import rank_of
from fedtune.privacy import distributed
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.privacy.secagg import flat, settings, shares, stages
from fedtune.privacy.secagg.errors import SecAggError
from fedtune.privacy.secagg.graph import neighbours
from fedtune.privacy.secagg.masking import add, round_context
from fedtune.privacy.secagg.quantize import wire_dtype
from fedtune.privacy.skellam import SkellamEvent
from fedtune.server import traffic
from fedtune.server.bookkeeping import account_round, declined, record_site_epsilon, server_step
from fedtune.server.participants import scrub
from fedtune.server.record import Failure, RoundRecord, SecAggInfo
from fedtune.server.secagg_exchanges import Exchanges, enough, kind_of, owned
from fedtune.server.secagg_sum import Unmasked, aggregate
from fedtune.server.state import GridLike, ServerState
from fedtune.server.validation import (
    check_records,
    example_count,
    expected_keys,
    rank_ok,
    rank_range,
    refused,
    reported_epsilon,
)
from fedtune.wire import keys
from fedtune.wire.records import load_array

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Advert:
    public: stages.PublicKeys
    weight: float
    rank: int


def covered(ranks: Mapping[int, int], threshold: int, stage: str) -> None:
    """Raise ``SecAggError`` (abandon the round) when some rank band is trained by fewer than ``threshold``
    of the sites in ``ranks`` (node: declared LoRA rank): the sum, divided per entry, would show their
    update in that band as a round with fewer than t survivors would show theirs."""
    thin = [(a, b, c) for a, b, c in flat.bands(list(ranks.values())) if c < threshold]
    if thin:
        where = ", ".join(
            f"{a}..{b} trained by only {c} site(s) (node {', '.join(str(n) for n in sorted(ranks) if ranks[n] >= b)})"
            for a, b, c in thin
        )
        raise SecAggError(
            f"{stage}: LoRA components {where}, fewer than the threshold {threshold}; the sum would show "
            "their update there, so nothing is unmasked."
        )


def secagg_round(
    cfg: RunConfig,
    grid: GridLike,
    state: ServerState,
    rnd: int,
    nodes: list[int],
    record: RoundRecord,
    extra: Mapping[str, int | str],
    denominator: float,
) -> None:
    """Run one SecAgg+ round with ``nodes``; update ``state.global_arrays`` unless it is abandoned; fill
    ``record`` as ``plain_round.train_round`` does, plus ``record.secagg`` (parameters, survivors, per-stage bytes
    and seconds).

    ``denominator`` is what ``central`` and ``distributed`` DP divide the noised sum by (the expected number
    of clients). Under ``distributed`` the round is charged the noise its survivors' shares really add up to
    (``record.secagg.distributed``); an abandoned round is charged its target noise.
    """
    ex = Exchanges(grid, rnd, hide=frozenset(nodes) if state.hidden else None)
    info = SecAggInfo(stages=ex.stages)
    exhausted: list[int] = []
    survivors: list[int] = []
    try:
        survivors = _protocol(cfg, ex, state, rnd, nodes, extra, denominator, info, exhausted)
        updated = True
    except (SecAggError, ConfigError) as exc:
        info.abandoned = str(exc)
        reason = scrub(str(exc), ex.hide)
        log.warning("round %d: secure aggregation abandoned, global adapter unchanged: %s", rnd, reason)
        updated = False
    info.dropped = sorted(set(nodes) - set(survivors))
    dp = info.distributed
    released = SkellamEvent(dp.l1, dp.l2, dp.mu_released, 1) if updated and dp else None
    account_round(cfg, state, rnd, released=updated, event=released)
    record.failures = [Failure(n, r) for n, r in sorted(ex.failures.items())]
    record.replied, record.failed = len(survivors), len(record.failures)
    record.bytes_up = sum(s["bytes_up"] for s in ex.stages.values())
    record.bytes_down = sum(s["bytes_down"] for s in ex.stages.values())
    record.replied_nodes = survivors
    record.train_loss = None  # no site reports a loss under secure aggregation
    record.updated, record.secagg = updated, info
    if exhausted:
        record.budget_exhausted_nodes = sorted(exhausted)


def _protocol(
    cfg: RunConfig,
    ex: Exchanges,
    state: ServerState,
    rnd: int,
    nodes: list[int],
    extra: Mapping[str, int | str],
    denominator: float,
    info: SecAggInfo,
    exhausted: list[int],
) -> list[int]:
    """The four stages; returns U3 (whose inputs are in the applied sum) or raises to abandon the round."""
    settings.resolve(cfg, len(nodes))  # refuse before talking to anyone
    spec = ConfigRecord({**cfg.to_flat(), keys.ROUND: rnd, keys.RUN_ID: state.run_id, **extra})
    timeout = cfg.secagg.stage_timeout
    full_rank = rank_of(state.global_arrays) or 0

    # Stage 1: public keys, examples and rank, in the clear.
    def advert(node: int, reply: Message) -> _Advert:
        check_records(reply.content, {keys.SECAGG: ConfigRecord, keys.METRICS: MetricRecord})
        record, metrics = reply.content.config_records[keys.SECAGG], reply.content.metric_records[keys.METRICS]
        examples, rank = example_count(metrics), metrics[keys.LORA_RANK]
        # 32 bytes each and not a low-order point; else this node fails the key stage and the round goes on
        public = stages.checked_publics(node, record[keys.SA_ENC_KEY], record[keys.SA_MASK_KEY])
        if not rank_ok(rank, full_rank):
            raise SecAggError(f"'{keys.LORA_RANK}' = {rank!r} is outside {rank_range(full_rank)}")
        weight = float(examples) if cfg.strategy.weighting == "examples" else 1.0
        return _Advert(public, weight, rank)

    ask = RecordDict({keys.SPEC: spec, keys.SECAGG: ConfigRecord({keys.ROUND: rnd})})
    adverts = ex.run("keys", kind_of(MessageType.QUERY, keys.SECAGG_KEYS), {n: ask for n in nodes}, timeout, advert)
    u1 = sorted(adverts)
    enough(u1, 2, "advertised keys")
    params = settings.resolve(cfg, len(u1))  # the graph is laid over U1
    info.degree, info.threshold, info.quant_bits = params.effective_degree, params.threshold, params.quant_bits
    info.modulus_bits, info.clip = params.modulus_bits, params.clip
    enough(u1, params.threshold, "advertised keys")
    for node in u1:
        state.node_ranks[node] = adverts[node].rank
    graph = neighbours(u1, params.degree)

    # Stage 2: each client's shares for its neighbours, encrypted; the server only relays them.
    def outbox(node: int, reply: Message) -> dict[int, bytes]:
        check_records(reply.content, {keys.SECAGG: ConfigRecord})
        return owned(reply.content.config_records[keys.SECAGG], keys.SA_IDS, keys.SA_CIPHERTEXTS, graph[node])

    def share_request(node: int) -> RecordDict:
        peers = sorted(graph[node])
        return RecordDict(
            {
                keys.SECAGG: ConfigRecord(
                    {
                        keys.ROUND: rnd,
                        keys.SA_THRESHOLD: params.threshold,
                        keys.SA_CLIENTS: len(u1),
                        keys.SA_IDS: peers,
                        keys.SA_ENC_KEY: [adverts[j].public.encryption for j in peers],
                        keys.SA_MASK_KEY: [adverts[j].public.mask for j in peers],
                    }
                )
            }
        )

    kind = kind_of(MessageType.QUERY, keys.SECAGG_SHARE)
    sent = ex.run("shares", kind, {n: share_request(n) for n in u1}, timeout, outbox)
    u2 = sorted(sent)
    enough(u2, params.threshold, "sent their shares")
    covered({i: adverts[i].rank for i in u2}, params.threshold, "before training")  # U3 can only be thinner

    # Stage 3: train and send alpha_i * delta_i, quantized and masked; only the running sum is kept.
    expected = expected_keys(state.global_arrays, cfg)
    length = flat.length(expected)
    top = max(adverts[i].weight for i in u2)
    alpha = {i: adverts[i].weight / top for i in u2}
    bits, cal = params.modulus_bits, None
    if MECHANISMS.get(cfg.privacy.mechanism).noise_in_sum:
        cal = distributed.calibrate(cfg, length, params.threshold)
        if found := distributed.problems(cfg, length, len(u2), params.threshold):
            raise ConfigError(" ".join(found))
        bits = cal.modulus_need(len(u2))
        info.modulus_bits = bits
    wire = wire_dtype(bits)
    state.global_arrays = traffic.received_adapter(cfg, state, rnd)  # what the sites train from
    adapters = {rank: traffic.adapter_records(cfg, state, rnd, rank) for rank in {adverts[i].rank for i in u2}}

    def train_request(node: int) -> RecordDict:
        senders = sorted(set(graph[node]) & set(u2))
        record: dict[str, Any] = {
            keys.ROUND: rnd,
            keys.SA_IDS: senders,
            keys.SA_CIPHERTEXTS: [sent[j][node] for j in senders],
            keys.SA_ALPHA: alpha[node],
            keys.SA_QUANT_BITS: params.quant_bits,
            keys.SA_CLIP: params.clip,
            keys.SA_MODULUS_BITS: bits,
            keys.SA_LENGTH: length,
        }
        return RecordDict({**adapters[adverts[node].rank], keys.SPEC: spec, keys.SECAGG: ConfigRecord(record)})

    total: list[np.ndarray] = []

    def fold(node: int, reply: Message) -> bool | None:
        check_records(reply.content, {keys.MASKED: ArrayRecord, keys.METRICS: MetricRecord})
        if declined(reply, node, state):
            exhausted.append(node)
            return None
        arrays = reply.content.array_records[keys.MASKED]
        if list(arrays) != [keys.MASKED]:
            raise SecAggError(f"the masked reply must hold one array '{keys.MASKED}', got {list(arrays)}")
        vector = load_array(arrays[keys.MASKED], keys.MASKED)
        if vector.dtype != wire or vector.shape != (length,):
            raise SecAggError(f"masked input is {vector.dtype} {vector.shape}, expected {wire} ({length},)")
        epsilon = reported_epsilon(reply.content.metric_records.get(keys.METRICS, {}))
        total[:] = [add([*total, vector], bits)]  # the last step, and one assignment: all of the reply or none
        record_site_epsilon(epsilon, node, state)
        return True

    kind = kind_of(MessageType.TRAIN, keys.SECAGG_TRAIN)
    masked = ex.run("masked", kind, {n: train_request(n) for n in u2}, cfg.server.round_timeout, fold)
    u3 = sorted(masked)
    enough(u3, max(params.threshold, cfg.server.min_replies), "sent their masked input")
    dropped = sorted(set(u2) - set(u3))
    info.survivors, info.recovered = len(u3), dropped

    # The declared ranks that size each entry's divisor are the ones checked here, before anything is unmasked.
    weights = {i: (alpha[i], adverts[i].rank) for i in u3}
    covered({i: rank for i, (_, rank) in weights.items()}, params.threshold, "before unmasking")

    # Stage 4: seed shares of the survivors, key shares of the dropped; then unmask and step.
    def shares_of(node: int, reply: Message) -> tuple[dict[int, bytes], dict[int, bytes]]:
        check_records(reply.content, {keys.SECAGG: ConfigRecord})
        record = reply.content.config_records[keys.SECAGG]
        seeds = owned(record, keys.SA_SEED_OWNERS, keys.SA_SEED_SHARES, within=u3)
        key_shares = owned(record, keys.SA_KEY_OWNERS, keys.SA_KEY_SHARES, within=dropped)
        if any(len(v) != shares.SHARE_BYTES for v in [*seeds.values(), *key_shares.values()]):
            raise SecAggError(f"every share must be {shares.SHARE_BYTES} bytes")
        return seeds, key_shares

    ask_unmask = RecordDict(
        {keys.SECAGG: ConfigRecord({keys.ROUND: rnd, keys.SA_SURVIVORS: u3, keys.SA_DROPPED: dropped})}
    )
    kind = kind_of(MessageType.QUERY, keys.SECAGG_UNMASK)
    replies = ex.run("unmask", kind, {n: ask_unmask for n in u3}, timeout, shares_of)
    start = time.monotonic()
    context = round_context(rnd, state.run_id.encode())
    masked_with = {j: graph[j] & set(u3) for j in dropped}
    publics = {i: adverts[i].public.mask for i in u1}
    try:
        ints = stages.unmask_sum(
            total[0], replies.values(), u3, masked_with, publics, bits, rnd, context, params.threshold
        )
    except SecAggError:
        raise
    except Exception as exc:  # the shares and keys come from the sites: a failure here abandons the round
        raise SecAggError(f"unmasking failed: {refused(exc)}") from exc
    summed = Unmasked(ints, bits, params, cal, weights)
    delta = aggregate(cfg, summed, expected, denominator, state, info)
    state.global_arrays = {**state.global_arrays, **server_step(cfg, state, delta)}
    ex.stages["unmask"]["seconds"] += time.monotonic() - start
    return u3
