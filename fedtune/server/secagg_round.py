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
   entry, over the sites whose rank covers it), then takes the strategy's server step.

A round that cannot finish (too few clients at some stage, a corrupt share) is abandoned: nothing is
released and the global adapter stays as it was; the row says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune import keys
from fedtune.config import RunConfig
from fedtune.errors import ConfigError
from fedtune.lora import rank_of
from fedtune.privacy import rounds as privacy
from fedtune.privacy.secagg import flat, settings, stages
from fedtune.privacy.secagg.errors import SecAggError, TooFewSurvivors
from fedtune.privacy.secagg.graph import neighbours
from fedtune.privacy.secagg.masking import add, round_context
from fedtune.privacy.secagg.quantize import wire_dtype
from fedtune.server import traffic
from fedtune.server.loop import (
    GridLike,
    ServerState,
    account_round,
    declined,
    record_site_epsilon,
    release,
    server_step,
    stream_replies,
)
from fedtune.server.validation import expected_keys
from fedtune.wire import payload_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")
KEY_BYTES = 32


def _payload(content: RecordDict) -> int:
    """Bytes of array data and of byte strings (keys, ciphertexts, shares) a message carries."""
    total = sum(payload_bytes(r) for r in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


@dataclass
class _Exchanges:
    """Sends each stage's messages, keeps what answered, and tallies failures, bytes and seconds."""

    grid: GridLike
    rnd: int
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)

    def run(
        self,
        stage: str,
        kind: str,
        contents: Mapping[int, RecordDict],
        timeout: float,
        handle: Callable[[int, Message], T | None],
    ) -> dict[int, T]:
        """Each node's ``handle``d reply; a node that errs, answers badly or not in time is a failure, one
        whose ``handle`` returns None simply leaves (a dp-sgd site out of budget)."""
        start = time.monotonic()
        messages = [Message(c, dst_node_id=n, message_type=kind, group_id=str(self.rnd)) for n, c in contents.items()]
        down, up, out, answered = sum(_payload(c) for c in contents.values()), 0, {}, set()
        for node, reply in stream_replies(self.grid, messages, timeout):
            if node not in contents or node in answered:
                continue  # not asked this stage, or a second answer
            answered.add(node)
            try:
                if reply.has_error():
                    raise SecAggError(f"client error: {reply.error.reason}")
                up += _payload(reply.content)
                value = handle(node, reply)
                if value is not None:
                    out[node] = value
            except (SecAggError, KeyError, TypeError, ValueError) as exc:
                self.fail(node, stage, str(exc))
            finally:
                release(reply)
        for node in sorted(set(contents) - answered):
            self.fail(node, stage, f"no reply within {timeout:g} s")
        n_down, n_up = max(len(contents), 1), max(len(answered), 1)
        self.stages[stage] = {
            "seconds": time.monotonic() - start,
            "clients": len(contents),
            "answered": len(out),
            "bytes_down": down,
            "bytes_up": up,
            "bytes_down_per_client": down / n_down,
            "bytes_up_per_client": up / n_up,
        }
        return out

    def fail(self, node: int, stage: str, reason: str) -> None:
        log.warning("round %d: secagg stage %s: node %d failed: %s", self.rnd, stage, node, reason)
        self.failures.setdefault(node, f"secagg {stage}: {reason}")


@dataclass(frozen=True)
class _Advert:
    public: stages.PublicKeys
    weight: float
    rank: int


def secagg_round(
    cfg: RunConfig,
    grid: GridLike,
    state: ServerState,
    rnd: int,
    nodes: list[int],
    row: dict[str, Any],
    extra: Mapping[str, int | str],
    denominator: float,
) -> None:
    """Run one SecAgg+ round with ``nodes``; update ``state.global_arrays`` unless it is abandoned; fill ``row``
    as ``loop._train_round`` does, plus ``row["secagg"]`` (parameters, survivors, per-stage bytes and seconds).

    ``denominator`` is what ``central`` DP divides the noised sum by (the expected number of clients).
    """
    ex = _Exchanges(grid, rnd)
    info: dict[str, Any] = {"stages": ex.stages}
    exhausted: list[int] = []
    survivors: list[int] = []
    try:
        survivors = _protocol(cfg, ex, state, rnd, nodes, extra, denominator, info, exhausted)
        updated = True
    except (SecAggError, ConfigError) as exc:
        info["abandoned"] = str(exc)
        log.warning("round %d: secure aggregation abandoned, global adapter unchanged: %s", rnd, exc)
        updated = False
    info["dropped"] = sorted(set(nodes) - set(survivors))
    account_round(cfg, state, rnd, released=updated)
    failures = [{"node": n, "reason": r} for n, r in sorted(ex.failures.items())]
    row.update(
        replied=len(survivors),
        failed=len(failures),
        failures=failures,
        bytes_up=sum(s["bytes_up"] for s in ex.stages.values()),
        bytes_down=sum(s["bytes_down"] for s in ex.stages.values()),
        replied_nodes=survivors,
        train_loss=None,  # no site reports a loss under secure aggregation
        updated=updated,
        secagg=info,
    )
    if exhausted:
        row["budget_exhausted_nodes"] = sorted(exhausted)


def _protocol(
    cfg: RunConfig,
    ex: _Exchanges,
    state: ServerState,
    rnd: int,
    nodes: list[int],
    extra: Mapping[str, int | str],
    denominator: float,
    info: dict[str, Any],
    exhausted: list[int],
) -> list[int]:
    """The four stages; returns U3 (whose inputs are in the applied sum) or raises to abandon the round."""
    settings.resolve(cfg, len(nodes))  # refuse before talking to anyone
    spec = ConfigRecord({**cfg.to_flat(), keys.ROUND: rnd, keys.RUN_ID: state.run_id, **extra})
    timeout = cfg.secagg.stage_timeout
    full_rank = rank_of(state.global_arrays) or 0

    # Stage 1: public keys, examples and rank, in the clear.
    def advert(node: int, reply: Message) -> _Advert:
        record, metrics = reply.content.config_records[keys.SECAGG], reply.content.metric_records[keys.METRICS]
        enc, mask = record[keys.SA_ENC_KEY], record[keys.SA_MASK_KEY]
        examples, rank = metrics[keys.NUM_EXAMPLES], metrics[keys.LORA_RANK]
        if not (isinstance(enc, bytes) and isinstance(mask, bytes) and len(enc) == len(mask) == KEY_BYTES):
            raise SecAggError("public keys must be two 32-byte strings")
        if not (isinstance(examples, int) and examples >= 1 and isinstance(rank, int) and 1 <= rank <= full_rank):
            raise SecAggError(f"'{keys.NUM_EXAMPLES}' = {examples!r} or '{keys.LORA_RANK}' = {rank!r} is invalid")
        weight = float(examples) if cfg.strategy.weighting == "examples" else 1.0
        return _Advert(stages.PublicKeys(enc, mask), weight, rank)

    ask = RecordDict({keys.SPEC: spec, keys.SECAGG: ConfigRecord({keys.ROUND: rnd})})
    adverts = ex.run("keys", _kind(MessageType.QUERY, keys.SECAGG_KEYS), {n: ask for n in nodes}, timeout, advert)
    u1 = sorted(adverts)
    _enough(u1, 2, "advertised keys")
    params = settings.resolve(cfg, len(u1))  # the graph is laid over U1
    info.update(
        degree=params.effective_degree,
        threshold=params.threshold,
        quant_bits=params.quant_bits,
        modulus_bits=params.modulus_bits,
        clip=params.clip,
    )
    _enough(u1, params.threshold, "advertised keys")
    for node in u1:
        state.node_ranks[node] = adverts[node].rank
    graph = neighbours(u1, params.degree)

    # Stage 2: each client's shares for its neighbours, encrypted; the server only relays them.
    def outbox(node: int, reply: Message) -> dict[int, bytes]:
        return _owned(reply.content.config_records[keys.SECAGG], keys.SA_IDS, keys.SA_CIPHERTEXTS, graph[node])

    def share_request(node: int) -> RecordDict:
        peers = sorted(graph[node])
        return RecordDict(
            {
                keys.SECAGG: ConfigRecord(
                    {
                        keys.ROUND: rnd,
                        keys.SA_THRESHOLD: params.threshold,
                        keys.SA_IDS: peers,
                        keys.SA_ENC_KEY: [adverts[j].public.encryption for j in peers],
                        keys.SA_MASK_KEY: [adverts[j].public.mask for j in peers],
                    }
                )
            }
        )

    kind = _kind(MessageType.QUERY, keys.SECAGG_SHARE)
    sent = ex.run("shares", kind, {n: share_request(n) for n in u1}, timeout, outbox)
    u2 = sorted(sent)
    _enough(u2, params.threshold, "sent their shares")

    # Stage 3: train and send alpha_i * delta_i, quantized and masked; only the running sum is kept.
    expected = expected_keys(state.global_arrays, cfg)
    length = flat.length(expected)
    top = max(adverts[i].weight for i in u2)
    alpha = {i: adverts[i].weight / top for i in u2}
    wire = wire_dtype(params.modulus_bits)
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
            keys.SA_MODULUS_BITS: params.modulus_bits,
            keys.SA_LENGTH: length,
        }
        return RecordDict({**adapters[adverts[node].rank], keys.SPEC: spec, keys.SECAGG: ConfigRecord(record)})

    total: list[np.ndarray] = []

    def fold(node: int, reply: Message) -> bool | None:
        if declined(reply, node, state):
            exhausted.append(node)
            return None
        arrays = reply.content.array_records[keys.MASKED]
        if list(arrays) != [keys.MASKED]:
            raise SecAggError(f"the masked reply must hold one array '{keys.MASKED}', got {list(arrays)}")
        vector = arrays[keys.MASKED].numpy()
        if vector.dtype != wire or vector.shape != (length,):
            raise SecAggError(f"masked input is {vector.dtype} {vector.shape}, expected {wire} ({length},)")
        total[:] = [add([*total, vector], params.modulus_bits)]
        record_site_epsilon(reply.content.metric_records.get(keys.METRICS, {}), node, state)
        return True

    kind = _kind(MessageType.TRAIN, keys.SECAGG_TRAIN)
    masked = ex.run("masked", kind, {n: train_request(n) for n in u2}, cfg.server.round_timeout, fold)
    u3 = sorted(masked)
    _enough(u3, max(params.threshold, cfg.server.min_replies), "sent their masked input")
    dropped = sorted(set(u2) - set(u3))
    info.update(survivors=len(u3), recovered=dropped)

    # Stage 4: seed shares of the survivors, key shares of the dropped; then unmask and step.
    def shares_of(node: int, reply: Message) -> tuple[dict[int, bytes], dict[int, bytes]]:
        record = reply.content.config_records[keys.SECAGG]
        seeds = _owned(record, keys.SA_SEED_OWNERS, keys.SA_SEED_SHARES)
        return seeds, _owned(record, keys.SA_KEY_OWNERS, keys.SA_KEY_SHARES)

    ask_unmask = RecordDict(
        {keys.SECAGG: ConfigRecord({keys.ROUND: rnd, keys.SA_SURVIVORS: u3, keys.SA_DROPPED: dropped})}
    )
    kind = _kind(MessageType.QUERY, keys.SECAGG_UNMASK)
    replies = ex.run("unmask", kind, {n: ask_unmask for n in u3}, timeout, shares_of)
    start = time.monotonic()
    context = round_context(rnd, state.run_id.encode())
    masked_with = {j: graph[j] & set(u3) for j in dropped}
    publics = {i: adverts[i].public.mask for i in u1}
    ints = stages.unmask_sum(total[0], replies.values(), u3, masked_with, publics, params.modulus_bits, rnd, context)
    summed = params.quantizer().dequantize_sum(ints, len(u3))  # sum_i alpha_i delta_i, float64 (L,)
    weights = {i: (alpha[i], adverts[i].rank) for i in u3}
    delta = _mean(cfg, summed, weights, expected, full_rank, denominator, state)
    state.global_arrays = {**state.global_arrays, **server_step(cfg, state, delta)}
    ex.stages["unmask"]["seconds"] += time.monotonic() - start
    return u3


def _mean(
    cfg: RunConfig,
    summed: np.ndarray,
    weights: Mapping[int, tuple[float, int]],
    expected: dict[str, np.ndarray],
    full_rank: int,
    denominator: float,
    state: ServerState,
) -> dict[str, np.ndarray]:
    """The round's aggregate from the sum: the noised sum over ``denominator`` (``central``), else the
    weighted mean, each entry divided by the alpha of the sites whose rank covers it."""
    if cfg.privacy.mechanism == "central":
        central = privacy.central_round(cfg, denominator, state.noise_rng)
        central.noised.add_sum(flat.unflatten(summed, expected), len(weights))
        return central.noised.result(expected)
    by_rank: dict[int, float] = {}
    for a, rank in weights.values():
        by_rank[rank] = by_rank.get(rank, 0.0) + a
    if set(by_rank) <= {full_rank}:
        return flat.unflatten(summed / sum(by_rank.values()), expected)
    cover = sum(a * flat.coverage(rank, expected) for rank, a in by_rank.items())
    mean = np.divide(summed, cover, out=np.zeros_like(summed), where=cover > 0)
    return flat.unflatten(mean, expected)


def _owned(
    record: Mapping[str, Any], owners_key: str, values_key: str, exactly: frozenset[int] | None = None
) -> dict[int, bytes]:
    """{owner: bytes} from two parallel lists; ``exactly``: the owners that must appear, once each."""
    owners, values = record[owners_key], record[values_key]
    if not (isinstance(owners, list) and isinstance(values, list) and len(owners) == len(values)):
        raise SecAggError(f"'{owners_key}' and '{values_key}' must be lists of equal length")
    if not all(isinstance(v, bytes) for v in values) or len(set(owners)) != len(owners):
        raise SecAggError(f"'{values_key}' must be byte strings, one per distinct owner")
    out = {int(o): v for o, v in zip(owners, values, strict=True)}
    if exactly is not None and set(out) != exactly:
        raise SecAggError(f"'{owners_key}' must be exactly the neighbours {sorted(exactly)}, got {sorted(out)}")
    return out


def _enough(who: list[int], needed: int, did: str) -> None:
    if len(who) < max(needed, 2):
        raise TooFewSurvivors(f"only {len(who)} client(s) {did}; the round needs at least {max(needed, 2)}.")


def _kind(category: str, action: str) -> str:
    return f"{category}.{action}"
