"""The site's half of SecAgg+ against a dishonest server: it refuses a threshold that is not a strict majority
of its share holders, a degree or threshold the round's settings do not give, and a neighbour's unusable
public key; and it draws its rounding dither from the OS, not from the public seed."""

from __future__ import annotations

import re
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.client import secagg as client_secagg
from fedtune.client.pipeline import LocalUpdate
from fedtune.config import RunConfig
from fedtune.model.lora import full_rank_like
from fedtune.privacy import distributed
from fedtune.privacy.secagg import flat
from fedtune.privacy.secagg.quantize import Quantizer
from fedtune.privacy.secagg.stages import ClientKeys, PublicKeys, advertise_keys
from fedtune.privacy.secagg.stages import share_keys as peer_share_keys
from fedtune.wire import keys

ROUND, ME, PEERS = 3, 1, [2, 3, 4, 5]  # five clients, complete graph: 5 share holders each
ORDER_8 = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")  # RFC 7748 small-order


def site_after_keys(monkeypatch: pytest.MonkeyPatch, **spec: Any) -> Context:
    """A site that answered the key stage of round ``ROUND`` under the round settings ``spec``."""
    return advertised(monkeypatch, **spec)[0]


def advertised(monkeypatch: pytest.MonkeyPatch, **spec: Any) -> tuple[Context, PublicKeys]:
    """``site_after_keys``, and the public keys the site advertised."""
    cfg = RunConfig.from_flat({"secagg.protocol": "secagg", **spec})
    stub = SimpleNamespace(train=[None] * 10, rank=cfg.lora.r)
    monkeypatch.setattr(client_secagg, "open_round", lambda msg, ctx: (cfg, {keys.ROUND: ROUND}, stub))
    context = Context(run_id=1, node_id=ME, node_config={}, state=RecordDict(), run_config={})
    ask = Message(RecordDict({keys.SECAGG: ConfigRecord({keys.ROUND: ROUND})}), ME, "query.secagg_keys")
    reply = client_secagg.advertise_keys(ask, context)
    assert not reply.has_error()
    record = reply.content.config_records[keys.SECAGG]
    return context, PublicKeys(record[keys.SA_ENC_KEY], record[keys.SA_MASK_KEY])  # type: ignore[arg-type]


def share_stage(
    context: Context,
    threshold: int,
    clients: int = 5,
    peer_keys: dict[int, ClientKeys] | None = None,
    **bad_keys: bytes | str,
) -> Message:
    """The site's answer to a share request; ``bad_keys``: e.g. ``mask_4=...`` replaces peer 4's mask key."""
    publics = {j: (peer_keys[j] if peer_keys else advertise_keys()).public() for j in PEERS}
    enc = [bad_keys.get(f"encryption_{j}", publics[j].encryption) for j in PEERS]
    mask = [bad_keys.get(f"mask_{j}", publics[j].mask) for j in PEERS]
    record = {
        keys.ROUND: ROUND,
        keys.SA_THRESHOLD: threshold,
        keys.SA_CLIENTS: clients,
        keys.SA_IDS: PEERS,
        keys.SA_ENC_KEY: enc,
        keys.SA_MASK_KEY: mask,
    }
    msg = Message(RecordDict({keys.SECAGG: ConfigRecord(record)}), ME, "query.secagg_share")
    return client_secagg.share_keys(msg, context)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("threshold", [1, 2, 6])
def test_a_site_refuses_a_threshold_that_is_not_a_strict_majority_of_its_holders(
    monkeypatch: pytest.MonkeyPatch, threshold: int
) -> None:
    # Prepare: the spec itself says this threshold, so only the majority rule stands in the way
    context = site_after_keys(monkeypatch, **{"secagg.threshold": threshold})
    # Execute
    reply = share_stage(context, threshold)
    # Assert
    assert reply.has_error()
    assert f"refuses threshold {threshold} for its 5 share holders: it must be a strict majority" in reply.error.reason


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("setting", "threshold"), [(0, 3), (3, 3), (4, 4), (5, 5)])
def test_a_site_accepts_a_strict_majority_its_spec_gives(
    monkeypatch: pytest.MonkeyPatch, setting: int, threshold: int
) -> None:
    context = site_after_keys(monkeypatch, **{"secagg.threshold": setting})
    reply = share_stage(context, threshold)
    assert not reply.has_error()
    assert list(reply.content.config_records[keys.SECAGG][keys.SA_IDS]) == PEERS


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("spec", "threshold", "clients", "needle"),
    [
        ({}, 4, 5, "threshold 4, but .* give 4 and 3 for 5 clients"),  # a majority, but not the auto one
        ({"secagg.threshold": 4}, 3, 5, "threshold 3, but .* give 4 and 4 for 5 clients"),
        ({"secagg.degree": 2}, 3, 5, "assigned 4 neighbours .* give 2 and 2 for 5 clients"),
        ({}, 3, 9, "assigned 4 neighbours .* give 8 and 5 for 9 clients"),
        ({}, 3, 4, "says 4 clients advertised keys, but assigned 4 neighbours"),
    ],
)
def test_a_site_refuses_a_degree_or_threshold_its_spec_does_not_give(
    monkeypatch: pytest.MonkeyPatch, spec: dict[str, int], threshold: int, clients: int, needle: str
) -> None:
    context = site_after_keys(monkeypatch, **spec)
    reply = share_stage(context, threshold, clients)
    assert reply.has_error()
    assert re.search(needle, reply.error.reason), reply.error.reason


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"mask_4": ORDER_8}, "client 4's mask public key is a low-order X25519 point"),
        ({"encryption_3": bytes(32)}, "client 3's encryption public key is a low-order X25519 point"),
        ({"encryption_2": bytes(31)}, "client 2's encryption public key must be 32 bytes, got 31"),
        ({f"mask_{j}": "not a key" for j in PEERS}, "client 2's mask public key must be bytes, got str"),
    ],
)
def test_a_site_refuses_a_neighbours_unusable_public_key_naming_it(
    monkeypatch: pytest.MonkeyPatch, bad: dict[str, bytes | str], needle: str
) -> None:
    context = site_after_keys(monkeypatch)
    reply = share_stage(context, 3, **bad)
    assert reply.has_error() and needle in reply.error.reason, reply.error.reason


def delta(rank: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "m.q.lora_A.weight": rng.normal(0, 0.01, size=(rank, 24)).astype(np.float32),
        "m.q.lora_B.weight": rng.normal(0, 0.01, size=(32, rank)).astype(np.float32),
    }


def update_of(cfg: RunConfig, d: dict[str, np.ndarray]) -> LocalUpdate:
    site: Any = SimpleNamespace(name="site-a", rank=cfg.lora.r)
    return LocalUpdate(cfg, {keys.ROUND: ROUND}, site, d, {})


def public_seed_rng(cfg: RunConfig) -> np.random.Generator:
    """What a server that knows the config could compute: the generator the dither used to come from."""
    return np.random.default_rng([cfg.seed, ROUND, zlib.crc32(b"site-a")])


def test_the_rounding_dither_is_fresh_each_time_and_not_the_public_seeds() -> None:
    # Prepare: the same update, quantized twice, as two runs with the same seed would
    cfg = RunConfig.from_flat({"secagg.protocol": "secagg", "lora.r": 4, "seed": 0})
    d = delta()
    like = full_rank_like(d, 4)
    record = {keys.SA_LENGTH: flat.length(like), keys.SA_CLIP: 0.1, keys.SA_QUANT_BITS: 8, keys.SA_ALPHA: 1.0}
    quantizer = Quantizer(clip=0.1, bits=8)
    # Execute
    first = client_secagg._quantized_input(update_of(cfg, d), record)
    second = client_secagg._quantized_input(update_of(cfg, d), record)
    # Assert: the draws differ, neither is the server's recomputation, and each is still within one step
    server = quantizer.quantize(flat.flatten(d, like), public_seed_rng(cfg))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, server) and not np.array_equal(second, server)
    for q in (first, second):
        assert np.all(np.abs(quantizer.dequantize_sum(q, 1) - flat.flatten(d, like)) <= quantizer.step * (1 + 1e-6))


def test_the_distributed_dither_is_fresh_each_time_and_not_the_public_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: no noise share, so only the conditional rounding's dither is random
    flat_cfg = {
        "secagg.protocol": "secagg",
        "privacy.mechanism": "distributed",
        "strategy.weighting": "uniform",
        "privacy.noise-multiplier": 1.0,
        "privacy.clip-norm": 0.1,
        "secagg.quant-bits": 12,
        "lora.r": 4,
    }
    cfg = RunConfig.from_flat(flat_cfg)
    monkeypatch.setattr(distributed, "noise_share", lambda size, mu, rng: np.zeros(size, np.int64))
    d = delta()
    like = full_rank_like(d, 4)
    cal = distributed.calibrate(cfg, flat.length(like), 3)
    bits = cal.modulus_need(5)
    record = {keys.SA_LENGTH: flat.length(like)}
    # Execute
    first, fewest = client_secagg._noised_input(update_of(cfg, d), record, 3, bits)
    second, _ = client_secagg._noised_input(update_of(cfg, d), record, 3, bits)
    # Assert
    server = distributed.to_ring(distributed.encode(flat.flatten(d, like), 0.1, cal, public_seed_rng(cfg)), bits)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, server) and not np.array_equal(second, server)
    assert fewest == cal.min_survivors == 3


def masked_stage(
    monkeypatch: pytest.MonkeyPatch, context: Context, mine: PublicKeys, peer_keys: dict[int, ClientKeys], **spec: Any
) -> Message:
    """The site's answer to the training stage, with shares from peers 2 and 3 and the training replaced by
    a fixed delta under the stage's spec ``spec``."""
    cfg = RunConfig.from_flat({"secagg.protocol": "secagg", "lora.r": 4, **spec})
    monkeypatch.setattr(client_secagg, "local_update", lambda msg, ctx: update_of(cfg, delta()))
    everyone = {ME: mine, **{j: k.public() for j, k in peer_keys.items()}}
    senders = [2, 3]
    blobs = []
    for j in senders:
        neighbours = {i: p for i, p in everyone.items() if i != j}
        blobs.append(peer_share_keys(j, peer_keys[j], neighbours, 3, ROUND)[2][ME])
    length = flat.length(full_rank_like(delta(), 4))
    record = {
        keys.ROUND: ROUND,
        keys.SA_IDS: senders,
        keys.SA_CIPHERTEXTS: blobs,
        keys.SA_ALPHA: 1.0,
        keys.SA_QUANT_BITS: 8,
        keys.SA_CLIP: 0.1,
        keys.SA_MODULUS_BITS: 32,
        keys.SA_LENGTH: length,
    }
    msg = Message(RecordDict({keys.SECAGG: ConfigRecord(record)}), ME, "train.secagg")
    return client_secagg.masked_input(msg, context)


@pytest.mark.usefixtures("task_identity")
def test_the_training_stage_refuses_a_spec_that_gives_another_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the site checked t = 3 (auto for 5 clients) in the share stage
    context, mine = advertised(monkeypatch)
    peer_keys = {j: advertise_keys() for j in PEERS}
    assert not share_stage(context, 3, peer_keys=peer_keys).has_error()
    # Execute: the training stage's spec says `secagg.threshold` = 4, which would size the noise for 4 sites
    reply = masked_stage(monkeypatch, context, mine, peer_keys, **{"secagg.threshold": 4})
    # Assert
    assert reply.has_error()
    assert "assigned 4 neighbours and threshold 3, but" in reply.error.reason and "give 4 and 4" in reply.error.reason


DIST = {
    "privacy.mechanism": "distributed",
    "strategy.weighting": "uniform",
    "privacy.noise-multiplier": 1.0,
    "privacy.clip-norm": 0.1,
    "secagg.quant-bits": 8,
}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("survivors", "refused"), [([1, 2, 3], True), ([1, 2, 3, 4], False)])
def test_under_distributed_dp_a_site_will_not_unmask_fewer_sites_than_its_noise_share_assumes(
    monkeypatch: pytest.MonkeyPatch, survivors: list[int], refused: bool
) -> None:
    # Prepare: t = 3, but `server.min-replies` = 4 sized each noise share for a sum of at least 4 sites
    spec = {**DIST, "server.min-clients": 5, "server.min-replies": 4}
    context, mine = advertised(monkeypatch, **spec)
    peer_keys = {j: advertise_keys() for j in PEERS}
    assert not share_stage(context, 3, peer_keys=peer_keys).has_error()
    assert not masked_stage(monkeypatch, context, mine, peer_keys, **spec).has_error()
    # Execute: the server asks to unmask with only `survivors` (a sum of 3 carries 3/4 of the target noise)
    dropped = sorted({2, 3} - set(survivors))
    record = {keys.ROUND: ROUND, keys.SA_SURVIVORS: survivors, keys.SA_DROPPED: dropped}
    ask = Message(RecordDict({keys.SECAGG: ConfigRecord(record)}), ME, "query.secagg_unmask")
    reply = client_secagg.unmask(ask, context)
    # Assert
    assert reply.has_error() is refused
    if refused:
        assert "3 survivors' noise shares add up to less than the round's target noise" in reply.error.reason
