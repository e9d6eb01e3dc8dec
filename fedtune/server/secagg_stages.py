"""The four SecAgg+ stages of one round as the server runs them (see ``secagg_round`` for the protocol)."""

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
from fedtune.server import frame, traffic
from fedtune.server.bookkeeping import declined, record_site_epsilon, server_step
from fedtune.server.record import SecAggInfo
from fedtune.server.secagg_exchanges import Exchanges, enough, kind_of, owned
from fedtune.server.secagg_sum import Unmasked, aggregate
from fedtune.server.state import ServerState
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
class Advert:
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


class Stages:
    """One SecAgg+ round's stages, in order; each keeps what the next one needs (the answering sets U1 ⊇
    U2 ⊇ U3, the resolved parameters, the masking graph)."""

    def __init__(
        self,
        cfg: RunConfig,
        ex: Exchanges,
        state: ServerState,
        rnd: int,
        extra: Mapping[str, int | str],
        info: SecAggInfo,
    ) -> None:
        self.cfg, self.ex, self.state, self.rnd, self.info = cfg, ex, state, rnd, info
        self.spec = ConfigRecord({**cfg.to_flat(), keys.ROUND: rnd, keys.RUN_ID: state.run_id, **extra})
        self.timeout = cfg.secagg.stage_timeout
        self.full_rank = rank_of(state.global_arrays) or 0
        self.u3: list[int] = []

    def advertise(self, nodes: list[int]) -> None:
        """Stage 1: public keys, examples and rank, in the clear; the graph is laid over U1."""
        cfg, full_rank = self.cfg, self.full_rank

        def advert(node: int, reply: Message) -> Advert:
            check_records(reply.content, {keys.SECAGG: ConfigRecord, keys.METRICS: MetricRecord})
            record, metrics = reply.content.config_records[keys.SECAGG], reply.content.metric_records[keys.METRICS]
            examples, rank = example_count(metrics), metrics[keys.LORA_RANK]
            # 32 bytes each and not a low-order point; else this node fails the key stage and the round goes on
            public = stages.checked_publics(node, record[keys.SA_ENC_KEY], record[keys.SA_MASK_KEY])
            if not rank_ok(rank, full_rank):
                raise SecAggError(f"'{keys.LORA_RANK}' = {rank!r} is outside {rank_range(full_rank)}")
            weight = float(examples) if cfg.strategy.weighting == "examples" else 1.0
            return Advert(public, weight, rank)

        ask = RecordDict({keys.SPEC: self.spec, keys.SECAGG: ConfigRecord({keys.ROUND: self.rnd})})
        kind = kind_of(MessageType.QUERY, keys.SECAGG_KEYS)
        self.adverts = self.ex.run("keys", kind, {n: ask for n in nodes}, self.timeout, advert)
        self.u1 = sorted(self.adverts)
        enough(self.u1, 2, "advertised keys")
        self.params = params = settings.resolve(cfg, len(self.u1))
        info = self.info
        info.degree, info.threshold, info.quant_bits = params.effective_degree, params.threshold, params.quant_bits
        info.modulus_bits, info.clip = params.modulus_bits, params.clip
        enough(self.u1, params.threshold, "advertised keys")
        for node in self.u1:
            self.state.node_ranks[node] = self.adverts[node].rank
        self.graph = neighbours(self.u1, params.degree)

    def share(self) -> None:
        """Stage 2: each client's shares for its neighbours, encrypted; the server only relays them."""
        graph, adverts, u1, threshold = self.graph, self.adverts, self.u1, self.params.threshold

        def outbox(node: int, reply: Message) -> dict[int, bytes]:
            check_records(reply.content, {keys.SECAGG: ConfigRecord})
            return owned(reply.content.config_records[keys.SECAGG], keys.SA_IDS, keys.SA_CIPHERTEXTS, graph[node])

        def share_request(node: int) -> RecordDict:
            peers = sorted(graph[node])
            record: dict[str, Any] = {
                keys.ROUND: self.rnd,
                keys.SA_THRESHOLD: threshold,
                keys.SA_CLIENTS: len(u1),
                keys.SA_IDS: peers,
                keys.SA_ENC_KEY: [adverts[j].public.encryption for j in peers],
                keys.SA_MASK_KEY: [adverts[j].public.mask for j in peers],
            }
            return RecordDict({keys.SECAGG: ConfigRecord(record)})

        kind = kind_of(MessageType.QUERY, keys.SECAGG_SHARE)
        self.sent = self.ex.run("shares", kind, {n: share_request(n) for n in u1}, self.timeout, outbox)
        self.u2 = sorted(self.sent)
        enough(self.u2, threshold, "sent their shares")
        covered({i: adverts[i].rank for i in self.u2}, threshold, "before training")  # U3 can only be thinner

    def _modulus(self) -> None:
        """The modulus and, under ``distributed`` DP, the noise calibration for the round's U2."""
        cfg, params = self.cfg, self.params
        self.bits, self.cal = params.modulus_bits, None
        if MECHANISMS.get(cfg.privacy.mechanism).noise_in_sum:
            self.cal = distributed.calibrate(cfg, self.length, params.threshold)
            if found := distributed.problems(cfg, self.length, len(self.u2), params.threshold):
                raise ConfigError(" ".join(found))
            self.bits = self.cal.modulus_need(len(self.u2))
            self.info.modulus_bits = self.bits

    def train(self, exhausted: list[int]) -> np.ndarray:
        """Stage 3: train and send alpha_i * delta_i, quantized and masked; only the running sum is kept."""
        cfg, state, rnd, adverts, u2 = self.cfg, self.state, self.rnd, self.adverts, self.u2
        self.expected = expected_keys(state.global_arrays, cfg)
        self.length = length = flat.length(self.expected)
        top = max(adverts[i].weight for i in u2)
        alpha = {i: adverts[i].weight / top for i in u2}
        self._modulus()
        bits, wire = self.bits, wire_dtype(self.bits)
        state.global_arrays = traffic.received_adapter(cfg, state, rnd)  # what the sites train from
        downlink = traffic.Downlink(cfg, state, rnd)  # the sites' ranks were learned from their replies

        def train_request(node: int) -> RecordDict:
            senders = sorted(set(self.graph[node]) & set(u2))
            record: dict[str, Any] = {
                keys.ROUND: rnd,
                keys.SA_IDS: senders,
                keys.SA_CIPHERTEXTS: [self.sent[j][node] for j in senders],
                keys.SA_ALPHA: alpha[node],
                keys.SA_QUANT_BITS: self.params.quant_bits,
                keys.SA_CLIP: self.params.clip,
                keys.SA_MODULUS_BITS: bits,
                keys.SA_LENGTH: length,
            }
            return RecordDict({**downlink.records(node), keys.SPEC: self.spec, keys.SECAGG: ConfigRecord(record)})

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
        masked = self.ex.run("masked", kind, {n: train_request(n) for n in u2}, cfg.server.round_timeout, fold)
        frame.forget(state.frame_holders, [n for n in u2 if n in self.ex.failures])  # LoRA-SB: they may lack it
        self.u3 = sorted(masked)
        enough(self.u3, max(self.params.threshold, cfg.server.min_replies), "sent their masked input")
        self.dropped = sorted(set(u2) - set(self.u3))
        self.info.survivors, self.info.recovered = len(self.u3), self.dropped
        # The declared ranks that size each entry's divisor are the ones checked here, before anything is unmasked.
        self.weights = {i: (alpha[i], adverts[i].rank) for i in self.u3}
        covered({i: rank for i, (_, rank) in self.weights.items()}, self.params.threshold, "before unmasking")
        return total[0]

    def unmask(self, total: np.ndarray, denominator: float) -> None:
        """Stage 4: seed shares of the survivors, key shares of the dropped; then unmask and step."""
        u3, dropped, state, rnd = self.u3, self.dropped, self.state, self.rnd

        def shares_of(node: int, reply: Message) -> tuple[dict[int, bytes], dict[int, bytes]]:
            check_records(reply.content, {keys.SECAGG: ConfigRecord})
            record = reply.content.config_records[keys.SECAGG]
            seeds = owned(record, keys.SA_SEED_OWNERS, keys.SA_SEED_SHARES, within=u3)
            key_shares = owned(record, keys.SA_KEY_OWNERS, keys.SA_KEY_SHARES, within=dropped)
            if any(len(v) != shares.SHARE_BYTES for v in [*seeds.values(), *key_shares.values()]):
                raise SecAggError(f"every share must be {shares.SHARE_BYTES} bytes")
            return seeds, key_shares

        ask = RecordDict(
            {keys.SECAGG: ConfigRecord({keys.ROUND: rnd, keys.SA_SURVIVORS: u3, keys.SA_DROPPED: dropped})}
        )
        kind = kind_of(MessageType.QUERY, keys.SECAGG_UNMASK)
        replies = self.ex.run("unmask", kind, {n: ask for n in u3}, self.timeout, shares_of)
        start = time.monotonic()
        context = round_context(rnd, state.run_id.encode())
        masked_with = {j: self.graph[j] & set(u3) for j in dropped}
        publics = {i: self.adverts[i].public.mask for i in self.u1}
        threshold = self.params.threshold
        try:
            ints = stages.unmask_sum(
                total, replies.values(), u3, masked_with, publics, self.bits, rnd, context, threshold
            )
        except SecAggError:
            raise
        except Exception as exc:  # the shares and keys come from the sites: a failure here abandons the round
            raise SecAggError(f"unmasking failed: {refused(exc)}") from exc
        summed = Unmasked(ints, self.bits, self.params, self.cal, self.weights)
        delta = aggregate(self.cfg, summed, self.expected, denominator, state, self.info)
        state.global_arrays = {**state.global_arrays, **server_step(self.cfg, state, delta)}
        self.ex.stages["unmask"]["seconds"] += time.monotonic() - start
