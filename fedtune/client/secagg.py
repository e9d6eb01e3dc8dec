"""The client's half of SecAgg+ (``secagg.protocol = secagg``): four handlers on the ClientApp.

Each stage calls the pure functions of ``fedtune.privacy.secagg.stages``; what a client must remember
between stages (its key pairs, self-mask seed, neighbours' keys, the shares it holds) stays in
``context.state``, keyed by round, and never leaves the site except as the protocol says. The masked
input reply carries the masked vector alone: no training loss or anything else derived from the data.

The share and unmask stages need no model, data or torch: this module imports the training pipeline
and the DP mechanisms only in the stages that train (key advertisement opens the site's data), so a
ClientApp process without a site worker answers those two stages in well under a second.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune.client.refusal import refuse
from fedtune.core.errors import FedtuneError
from fedtune.model.lora import full_rank_like
from fedtune.privacy.secagg import flat, settings, stages
from fedtune.privacy.secagg.crypto import KeyPair
from fedtune.privacy.secagg.errors import SecAggError, TooFewSurvivors
from fedtune.privacy.secagg.masking import round_context
from fedtune.privacy.secagg.quantize import Quantizer, wire_dtype
from fedtune.wire import keys

log = logging.getLogger(__name__)

_STATE_PREFIX = "secagg-round-"
# Only privacy bookkeeping may travel beside the masked vector (the epsilon a dp-sgd site spent, or its
# "budget exhausted" answer); a loss, a norm or a clipped bit would leak what secure aggregation hides.
_CLEAR_METRICS = (keys.EPSILON, keys.NOISE_MULTIPLIER, keys.BUDGET_EXHAUSTED)
# What a malformed stage message can raise while it is read: each becomes a refusal, never a crash.
_MALFORMED = (FedtuneError, KeyError, ValueError, TypeError, OverflowError)


def open_round(msg: Message, context: Context) -> tuple[Any, dict[str, Any], Any]:
    """:func:`fedtune.client.pipeline.open_round`, imported on first use."""
    from fedtune.client import pipeline

    return pipeline.open_round(msg, context)


def local_update(msg: Message, context: Context) -> Any:
    """:func:`fedtune.client.pipeline.local_update`, imported on first use."""
    from fedtune.client import pipeline

    return pipeline.local_update(msg, context)


def _round(msg: Message) -> int:
    record: Mapping[str, Any] = msg.content.config_records.get(keys.SECAGG, {})
    rnd = record.get(keys.ROUND)
    if not isinstance(rnd, int):
        raise SecAggError(f"secagg message without an integer `{keys.ROUND}`.")
    return rnd


def _state(context: Context, rnd: int) -> ConfigRecord:
    record = context.state.get(f"{_STATE_PREFIX}{rnd}")
    if not isinstance(record, ConfigRecord):
        raise SecAggError(f"no secure-aggregation state for round {rnd}: the earlier stages never reached this site.")
    return record


def _stage(msg: Message, context: Context) -> tuple[int, int, ConfigRecord, ConfigRecord]:
    """(round, this node's id, this round's state, the message's ``SECAGG`` record) of a later stage."""
    rnd = _round(msg)
    return rnd, int(context.node_id), _state(context, rnd), msg.content.config_records[keys.SECAGG]


def _fail(msg: Message, exc: Exception) -> Message:
    return refuse(msg, exc if isinstance(exc, FedtuneError) else SecAggError(f"malformed stage: {exc}"))


def _keys(state: ConfigRecord) -> stages.ClientKeys:
    return stages.ClientKeys(
        KeyPair(_bytes(state, "enc-private"), _bytes(state, "enc-public")),
        KeyPair(_bytes(state, "mask-private"), _bytes(state, "mask-public")),
    )


def _bytes(record: Mapping[str, Any], key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise SecAggError(f"`{key}` must be bytes, got {type(value).__name__}.")
    return value


def _int(record: Mapping[str, Any], key: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SecAggError(f"`{key}` must be an integer, got {value!r}.")
    return value


def _list(record: Mapping[str, Any], key: str) -> list[Any]:
    value = record.get(key, [])
    return list(value) if isinstance(value, list) else []


def _peers(record: Mapping[str, Any]) -> dict[int, stages.PublicKeys]:
    ids, enc, msk = _list(record, keys.SA_IDS), _list(record, keys.SA_ENC_KEY), _list(record, keys.SA_MASK_KEY)
    if not len(ids) == len(enc) == len(msk):
        raise SecAggError("neighbour ids and public keys differ in number.")
    return {int(i): stages.PublicKeys(e, m) for i, e, m in zip(ids, enc, msk, strict=True)}


def _reply(msg: Message, record: dict[str, Any], **extra: Any) -> Message:
    return Message(RecordDict({keys.SECAGG: ConfigRecord(record), **extra}), reply_to=msg)


def advertise_keys(msg: Message, context: Context) -> Message:
    """Stage 0: fresh key pairs for this round; the public halves, examples and rank go out in the clear."""
    try:
        cfg, extra, site = open_round(msg, context)
        rnd = int(extra[keys.ROUND])
    except FedtuneError as exc:
        return refuse(msg, exc)
    for name in [n for n in context.state if n.startswith(_STATE_PREFIX)]:
        del context.state[name]  # a round this site dropped out of
    pair = stages.advertise_keys()
    context.state[f"{_STATE_PREFIX}{rnd}"] = ConfigRecord(
        {
            "enc-private": pair.encryption.private,
            "enc-public": pair.encryption.public,
            "mask-private": pair.mask.private,
            "mask-public": pair.mask.public,
            # the round's settings, against which the share stage's degree and threshold are checked
            "degree-setting": cfg.secagg.degree,
            "threshold-setting": cfg.secagg.threshold,
        }
    )
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(site.train), keys.LORA_RANK: site.rank})
    public = {keys.SA_ENC_KEY: pair.encryption.public, keys.SA_MASK_KEY: pair.mask.public}
    return _reply(msg, public, **{keys.METRICS: metrics})


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 1: split a fresh self-mask seed and the mask secret key; encrypt each neighbour's shares.

    Refuses the round unless the threshold is a strict majority of this client's share holders and the
    neighbours and threshold are what the round's settings give for the clients that advertised keys,
    and refuses any neighbour's unusable public key (naming the neighbour)."""
    try:
        rnd, my_id, state, record = _stage(msg, context)
        peers = _peers(record)
        if my_id in peers:
            raise SecAggError(f"client {my_id} is listed as its own neighbour.")
        threshold, clients = _int(record, keys.SA_THRESHOLD), _int(record, keys.SA_CLIENTS)
        stages.check_threshold(my_id, len(peers) + 1, threshold)
        _check_assigned(state, clients, len(peers), threshold)
        seed, own, outbox = stages.share_keys(my_id, _keys(state), peers, threshold, rnd)
    except _MALFORMED as exc:
        return _fail(msg, exc)
    state.update(
        {
            "seed": seed,
            "threshold": threshold,
            "clients": clients,
            "held-owners": [my_id],
            "held-seed": [own.seed],
            "held-key": [own.key],
            **{f"peer-{k}": v for k, v in _peer_lists(peers).items()},
        }
    )
    ids = sorted(outbox)
    return _reply(msg, {keys.SA_IDS: ids, keys.SA_CIPHERTEXTS: [outbox[i] for i in ids]})


def _check_assigned(setting: Mapping[str, Any], clients: int, neighbours: int, threshold: int) -> None:
    settings.check_assigned(
        _int(setting, "degree-setting"), _int(setting, "threshold-setting"), clients, neighbours, threshold
    )


def _peer_lists(peers: Mapping[int, stages.PublicKeys]) -> dict[str, Any]:
    ids = sorted(peers)
    return {
        keys.SA_IDS: ids,
        keys.SA_ENC_KEY: [peers[i].encryption for i in ids],
        keys.SA_MASK_KEY: [peers[i].mask for i in ids],
    }


def masked_input(msg: Message, context: Context) -> Message:
    """Stage 2: decrypt the neighbours' shares, train, and reply with the quantized, masked, weighted delta."""
    from fedtune.privacy.mechanisms import MECHANISMS

    try:
        rnd, my_id, state, record = _stage(msg, context)
        keys_ = _keys(state)
        peers = _peers({k.removeprefix("peer-"): v for k, v in state.items() if k.startswith("peer-")})
        senders = [int(i) for i in _list(record, keys.SA_IDS)]
        blobs = _list(record, keys.SA_CIPHERTEXTS)
        if len(senders) != len(blobs):
            raise SecAggError("senders and ciphertexts differ in number.")
        held = stages.receive_shares(my_id, keys_, peers, dict(zip(senders, blobs, strict=True)), rnd)
        threshold = _int(state, "threshold")
        if len(held) + 1 < threshold:
            raise TooFewSurvivors(
                f"only {len(held)} neighbours sent shares; with this client, fewer than the threshold {threshold}."
            )
        update = local_update(msg, context)
        # this stage's spec must give the degree and threshold checked in the share stage (t sizes the noise)
        secagg_cfg = update.cfg.secagg
        spec = {"degree-setting": secagg_cfg.degree, "threshold-setting": secagg_cfg.threshold}
        _check_assigned(spec, _int(state, "clients"), len(peers), threshold)
        clear = {k: v for k, v in update.metrics.items() if k in _CLEAR_METRICS}
        if update.delta is None:  # a dp-sgd site out of budget: it simply drops out of the sum
            return Message(RecordDict({keys.METRICS: MetricRecord(clear)}), reply_to=msg)
        bits = _int(record, keys.SA_MODULUS_BITS)
        if MECHANISMS.get(update.cfg.privacy.mechanism).noise_in_sum:
            vector, min_survivors = _noised_input(update, record, threshold, bits)
            state["min-survivors"] = min_survivors  # the unmask stage refuses a sum of fewer noise shares
        else:
            vector = _quantized_input(update, record)
        context_bytes = round_context(rnd, str(update.extra.get(keys.RUN_ID, "")).encode())
        u2 = {j: peers[j] for j in held}  # the neighbours in U2: exactly those whose shares arrived
        masked = stages.masked_input(my_id, vector, _bytes(state, "seed"), keys_, u2, bits, rnd, context_bytes)
    except _MALFORMED as exc:
        return _fail(msg, exc)
    owners = sorted(held)
    state.update(
        {
            "held-owners": [*_list(state, "held-owners"), *owners],
            "held-seed": [*_list(state, "held-seed"), *(held[o].seed for o in owners)],
            "held-key": [*_list(state, "held-key"), *(held[o].key for o in owners)],
        }
    )
    array = ArrayRecord({keys.MASKED: Array(masked.astype(wire_dtype(bits), copy=False))})
    return Message(RecordDict({keys.MASKED: array, keys.METRICS: MetricRecord(clear)}), reply_to=msg)


def _quantized_input(update: Any, record: Mapping[str, Any]) -> np.ndarray:
    """alpha_i * delta at the global rank, flat, clipped per coordinate and quantized (uint32 (L,))."""
    from fedtune.privacy.central import clip as l2_clip
    from fedtune.privacy.central import noise_rng
    from fedtune.privacy.mechanisms import MECHANISMS

    cfg, delta = update.cfg, update.delta
    like = _checked_like(delta, cfg.lora.r, record)
    quantizer = Quantizer(clip=float(record[keys.SA_CLIP]), bits=int(record[keys.SA_QUANT_BITS]))
    if MECHANISMS.get(cfg.privacy.mechanism).clipped_sum:
        # Stochastic rounding moves each entry by < step, the vector by < sqrt(L) step: clip that much
        # tighter, so the dequantized delta still has L2 norm <= C (the noise's sensitivity).
        margin = math.sqrt(flat.length(like)) * quantizer.step
        if margin >= cfg.privacy.clip_norm / 2:
            raise SecAggError(
                f"`secagg.quant-bits` = {quantizer.bits} leaves a rounding margin {margin:.3g} too close to "
                f"`privacy.clip-norm` = {cfg.privacy.clip_norm}; raise the bits."
            )
        delta, _ = l2_clip(delta, cfg.privacy.clip_norm - margin)
    vector = flat.flatten(delta, like) * float(record[keys.SA_ALPHA])
    over = int(np.count_nonzero(np.abs(vector) > quantizer.clip))
    if over:  # logged here only: the count itself is data-derived and stays at the site
        log.warning(
            "%s: %d of %d values exceed `secagg.clip` = %.3g and are clipped; raise it.",
            *(update.site.name, over, vector.size, quantizer.clip),
        )
    # The rounding dither comes from the OS's entropy: from the public seed, the server could undo it.
    return quantizer.quantize(vector, noise_rng())


def _noised_input(update: Any, record: Mapping[str, Any], threshold: int, bits: int) -> tuple[np.ndarray, int]:
    """Distributed DP: the delta clipped to C, scaled, conditionally rounded, plus this client's Skellam
    share, modulo 2^bits (uint32 (L,)); and the fewest survivors whose shares add up to the target noise.
    The share's size comes from the round's spec and the threshold this client checked in the share
    stage, never from a number the server sends for it."""
    from fedtune.privacy import distributed
    from fedtune.privacy.central import noise_rng

    cfg, delta = update.cfg, update.delta
    like = _checked_like(delta, cfg.lora.r, record)
    cal = distributed.calibrate(cfg, flat.length(like), threshold)
    if cal.modulus_need(2) > bits:  # with any two clients the sum needs at least this
        raise SecAggError(f"modulus 2^{bits} has no room for this round's noise; the server miscalculated it.")
    ints = distributed.encode(flat.flatten(delta, like), cfg.privacy.clip_norm, cal, noise_rng())  # dither
    ints += distributed.noise_share(ints.size, cal.mu_share, noise_rng())  # both from OS entropy, never the seed
    return distributed.to_ring(ints, bits), cal.min_survivors


def _checked_like(delta: Any, rank: int, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    like = full_rank_like(delta, rank)
    if record.get(keys.SA_LENGTH) != flat.length(like):
        raise SecAggError(
            f"the server expects {record.get(keys.SA_LENGTH)} values, this site's delta has {flat.length(like)}."
        )
    return like


def unmask(msg: Message, context: Context) -> Message:
    """Stage 3: reveal seed shares of the survivors and key shares of the dropped, never both for one client."""
    try:
        _, my_id, state, record = _stage(msg, context)
        owners = [int(o) for o in _list(state, "held-owners")]
        seeds, key_shares = _list(state, "held-seed"), _list(state, "held-key")
        held = {o: stages.HeldShares(s, k) for o, s, k in zip(owners, seeds, key_shares, strict=True)}
        survivors = [int(i) for i in _list(record, keys.SA_SURVIVORS)]
        dropped = [int(i) for i in _list(record, keys.SA_DROPPED)]
        fewest = state.get("min-survivors")
        if isinstance(fewest, int) and len(set(survivors)) < fewest:
            raise TooFewSurvivors(
                f"{len(set(survivors))} survivors' noise shares add up to less than the round's target noise, "
                f"which needs {fewest}; round abandoned."
            )
        seed_out, key_out = stages.unmask_reply(my_id, held, survivors, dropped, _int(state, "threshold"))
    except _MALFORMED as exc:
        return _fail(msg, exc)
    finally:
        context.state.pop(f"{_STATE_PREFIX}{_safe_round(msg)}", None)  # one answer per round
    s_ids, k_ids = sorted(seed_out), sorted(key_out)
    return _reply(
        msg,
        {
            keys.SA_SEED_OWNERS: s_ids,
            keys.SA_SEED_SHARES: [seed_out[i] for i in s_ids],
            keys.SA_KEY_OWNERS: k_ids,
            keys.SA_KEY_SHARES: [key_out[i] for i in k_ids],
        },
    )


def _safe_round(msg: Message) -> int | None:
    try:
        return _round(msg)
    except SecAggError:
        return None
