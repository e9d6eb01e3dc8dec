"""SecAgg+ end to end on the tiny preset: the real server loop and ClientApp on the in-process backend.

Each round's change of the global adapter is compared with the plain FedAvg aggregate of the deltas the
clients really computed (recorded inside the ClientApp, never on the wire), within the quantization
bound: each survivor's stochastic rounding moves an entry by less than one step, so the weighted mean
moves by less than n * step / sum(alpha) (per entry, over the sites whose rank covers it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message

from fedtune.client import secagg as client_secagg
from fedtune.client.app import app as client_app
from fedtune.client.pipeline import LocalUpdate
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.model.lora import pad_rank, rank_of
from fedtune.model.sb import CORE
from fedtune.server import checkpoint
from fedtune.server.app import run_server
from fedtune.simulations.local import LocalGrid
from fedtune.strategies.aggregators import WeightedMean
from fedtune.wire import keys
from fedtune.wire.records import read_arrays

Arrays = dict[str, np.ndarray]
ClientFn = Callable[[Message, Context], Message]
SECAGG_KINDS = {"query.secagg_keys", "query.secagg_share", "train.secagg", "query.secagg_unmask"}
FAST = {
    "num-server-rounds": 2,
    "secagg.protocol": "secagg",
    "secagg.stage-timeout": 3.0,  # lost replies wait this long; training must fit in it under load
    "train.local-steps": 2,
    "train.batch-size": 2,
    "eval.federated": False,
    "eval.centralized": False,
}


class WireGrid(LocalGrid):
    """The shared backend, keeping every (message, reply) it carries; ``lose`` says which replies never
    arrive (the client ran, its answer is lost), ``alter`` may change a reply on its way to the server."""

    def __init__(
        self,
        client: ClientFn,
        num_sites: int,
        lose: Callable[[Message], bool] = lambda m: False,
        alter: Callable[[Message, Message], None] = lambda m, r: None,
    ) -> None:
        super().__init__(client, num_sites)
        self.lose, self.alter = lose, alter
        self.log: list[tuple[Message, Message]] = []

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        for message_id in list(self.pending):
            if message_id in wanted:
                msg = self.pending.pop(message_id)
                reply = self._handle(msg)
                self.alter(msg, reply)
                self.log.append((msg, _snapshot(reply)))
                return [] if self.lose(msg) else [reply]
        return []


def _snapshot(reply: Message) -> Any:
    """What the server received, copied before it releases the reply's arrays."""
    if reply.has_error():
        return {"error": reply.error.reason}
    content = reply.content
    return {
        "arrays": {n: {k: v.numpy().copy() for k, v in r.items()} for n, r in content.array_records.items()},
        "configs": {n: dict(r) for n, r in content.config_records.items()},
        "metrics": {n: dict(r) for n, r in content.metric_records.items()},
    }


def record_deltas(mp: pytest.MonkeyPatch) -> dict[tuple[int, int], LocalUpdate]:
    """Every clear delta a site computes under secagg, by (round, node): recorded inside the ClientApp."""
    seen: dict[tuple[int, int], LocalUpdate] = {}
    real = client_secagg.local_update

    def recording(msg: Message, context: Context) -> LocalUpdate:
        update = real(msg, context)
        seen[int(update.extra[keys.ROUND]), int(context.node_id)] = update
        return update

    mp.setattr(client_secagg, "local_update", recording)
    return seen


@pytest.fixture
def deltas(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, int], LocalUpdate]:
    return record_deltas(monkeypatch)


def federate(
    tiny_model: Path, out: Path, flat: dict[str, Any], grid_fn: Callable[[int], LocalGrid] | None = None
) -> tuple[list[dict[str, Any]], LocalGrid]:
    base = {**preset("tiny"), "model.name": str(tiny_model), "output.dir": str(out), "simulation.backend": "shared"}
    plan = Plan.from_flat({**base, **flat})
    n = plan.base.simulation.num_supernodes
    grid = grid_fn(n) if grid_fn else WireGrid(client_app, n)
    run_server(plan, grid)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, grid


def adapter(out: Path, rnd: int) -> Arrays:
    return checkpoint.load(out / "checkpoints" / f"round-{rnd:03d}").global_arrays


def fedavg(updates: list[LocalUpdate], like: Arrays) -> tuple[Arrays, Arrays]:
    """The plain path's weighted mean of ``updates`` (examples), and sum(alpha) per entry for the bound."""
    mean, cover = WeightedMean(), {k: np.zeros(v.shape) for k, v in like.items()}
    top = max(u.metrics[keys.NUM_EXAMPLES] for u in updates)
    for u in updates:
        assert u.delta is not None and set(u.delta) == set(like)
        padded, masks = pad_rank(u.delta, like)
        w = float(u.metrics[keys.NUM_EXAMPLES])
        mean.add(padded, w, rank=rank_of(u.delta))
        for k in like:
            cover[k] += w / top * masks[k]
    return mean.result(), cover


def assert_round_is_fedavg(
    out: Path, rnd: int, row: dict[str, Any], updates: list[LocalUpdate], sent_keys: Iterable[str]
) -> float:
    """The round moved the adapter by the FedAvg of ``updates`` within n*step/sum(alpha); returns the worst error."""
    before, after = adapter(out, rnd - 1), adapter(out, rnd)
    like = {k: before[k] for k in sent_keys}
    reference, cover = fedavg(updates, like)
    step = 2 * row["secagg"]["clip"] / (2 ** row["secagg"]["quant_bits"] - 1)
    worst = 0.0
    for k in before:
        moved = after[k].astype(np.float64) - before[k]
        if k not in like:  # not sent (A under FFA): never changes
            np.testing.assert_array_equal(moved, 0)
            continue
        bound = len(updates) * step / np.where(cover[k] > 0, cover[k], np.inf) + 1e-6
        err = np.abs(moved - reference[k])
        assert np.all(err <= bound), (k, float(err.max()), float(bound.min()))
        worst = max(worst, float((err / bound).max()))
    # every delta fits the quantization range, so nothing was clipped away
    assert max(float(np.abs(v).max()) for u in updates for v in (u.delta or {}).values()) < row["secagg"]["clip"]
    return worst


def updates_of(deltas: dict[tuple[int, int], LocalUpdate], rnd: int, nodes: Iterable[int]) -> list[LocalUpdate]:
    return [deltas[rnd, n] for n in sorted(nodes)]


@pytest.fixture(scope="module")
def plain_and_secagg(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same seeded federation without and with secure aggregation (shared by two tests)."""
    base = tmp_path_factory.mktemp("secagg")
    mp = pytest.MonkeyPatch()
    seen = record_deltas(mp)
    try:
        plain, _ = federate(tiny_model, base / "plain", {**FAST, "secagg.protocol": "none"})
        rows, grid = federate(tiny_model, base / "secagg", FAST)
    finally:
        mp.undo()
    return {"base": base, "plain": plain, "rows": rows, "grid": grid, "deltas": seen}


def test_secagg_fedavg_equals_the_plain_run_within_the_quantization_bound(plain_and_secagg: dict[str, Any]) -> None:
    # Prepare
    base, rows, deltas = plain_and_secagg["base"], plain_and_secagg["rows"], plain_and_secagg["deltas"]
    secagg, plain = base / "secagg", base / "plain"
    keys_all = list(adapter(secagg, 0))

    # Assert: every round is the FedAvg (weighted by examples) of what the three sites computed
    for rnd in (1, 2):
        row = rows[rnd]
        assert row["updated"] and row["replied"] == 3 and row["secagg"]["survivors"] == 3
        assert row["train_loss"] is None
        assert_round_is_fedavg(secagg, rnd, row, updates_of(deltas, rnd, [1, 2, 3]), keys_all)
    # ... and round 1 lands where the plain run's round 1 does (same seed, same start, same deltas)
    row = rows[1]
    step = 2 * row["secagg"]["clip"] / (2 ** row["secagg"]["quant_bits"] - 1)
    examples = [deltas[1, n].metrics[keys.NUM_EXAMPLES] for n in (1, 2, 3)]
    bound = 3 * step / (sum(examples) / max(examples)) + 1e-6
    one_plain, one_secagg = adapter(plain, 1), adapter(secagg, 1)
    assert max(float(np.abs(one_plain[k] - one_secagg[k]).max()) for k in keys_all) <= bound
    # (Round 2 is checked against the deltas its sites computed, above, not against the plain run's round 2:
    # its sites start from adapters 1e-6 apart, and AdamW's sign-like first steps turn that into up to 4e-3.)
    # the row carries the protocol's parameters and per-stage traffic and time
    info = row["secagg"]
    assert (info["degree"], info["threshold"], info["modulus_bits"], info["dropped"]) == (2, 2, 18, [])
    assert set(info["stages"]) == {"keys", "shares", "masked", "unmask"}
    length = sum(v.size for v in one_secagg.values())
    assert info["stages"]["masked"]["bytes_up_per_client"] >= 4 * length  # uint32 on the wire: 18-bit modulus
    assert row["bytes_up"] == sum(s["bytes_up"] for s in info["stages"].values())
    # summary.json states the protocol's rounds and trust assumption; the plain run has no such section
    secure = json.loads((secagg / "summary.json").read_text())["secure_aggregation"]
    assert secure["rounds"] == [1, 2] and "honest-but-curious" in secure["trust"]
    assert "secure_aggregation" not in json.loads((plain / "summary.json").read_text())


def test_the_server_never_receives_a_clear_delta_under_secagg(plain_and_secagg: dict[str, Any]) -> None:
    # Prepare
    grid: WireGrid = plain_and_secagg["grid"]
    allowed_metrics = {
        "query.secagg_keys": {keys.NUM_EXAMPLES, keys.LORA_RANK},
        "train.secagg": set(),
        "query.secagg_share": set(),
        "query.secagg_unmask": set(),
    }

    # Assert: only secagg messages went out, and every reply holds keys, ciphertexts, shares or one uint vector
    kinds = {m.metadata.message_type for m, _ in grid.log}
    assert kinds == SECAGG_KINDS
    for msg, seen in grid.log:
        kind = msg.metadata.message_type
        assert "error" not in seen
        assert set(seen["metrics"].get(keys.METRICS, {})) <= allowed_metrics[kind]
        for record in seen["configs"].values():
            for value in record.values():
                assert isinstance(value, bytes) or all(type(v) in (int, bytes) for v in value)
        if kind != "train.secagg":
            assert seen["arrays"] == {}
            continue
        assert list(seen["arrays"]) == [keys.MASKED] and list(seen["arrays"][keys.MASKED]) == [keys.MASKED]
        vector = seen["arrays"][keys.MASKED][keys.MASKED]
        assert vector.dtype == np.uint32 and vector.ndim == 1
        # A quantized small delta sits near 2^15; masked, it fills the 18-bit range uniformly
        assert int(vector.max()) >= 2**17 and abs(float(vector.mean()) / 2**17 - 1) < 0.05


@pytest.mark.parametrize(
    ("flat", "sent"),
    [
        ({"lora.freeze-a": True}, lambda k: ".lora_B." in k),
        ({"lora.r": 4, "simulation.site-ranks": "4,4,2", "server.min-clients": 3}, lambda k: True),
        ({"lora.share": "a"}, lambda k: ".lora_A." in k),
        ({"peft.method": "lora-sb"}, lambda k: CORE in k),
    ],
    ids=["ffa", "hetero-ranks", "fedsa", "lora-sb"],
)
def test_ffa_and_heterogeneous_ranks_aggregate_like_the_plain_rules(
    tiny_model: Path, tmp_path: Path, deltas: dict[tuple[int, int], LocalUpdate], flat: dict[str, Any], sent: Any
) -> None:
    # Execute
    rows, grid = federate(tiny_model, tmp_path / "run", {**FAST, **flat})

    # Assert: FFA sends B only (A never moves); ranks 4, 4, 2 are averaged per entry over who trained it;
    # LoRA-SB sends its cores, and its fixed A and B go down with round 1's training stage only
    sent_keys = [k for k in adapter(tmp_path / "run", 0) if sent(k)]
    for rnd in (1, 2):
        assert rows[rnd]["updated"]
        assert_round_is_fedavg(tmp_path / "run", rnd, rows[rnd], updates_of(deltas, rnd, [1, 2, 3]), sent_keys)
    if "peft.method" in flat:
        trained = [m for m, _ in grid.log if m.metadata.message_type == "train.secagg"]  # type: ignore[attr-defined]
        down = {(m.metadata.group_id, tuple(sorted(read_arrays(m.content, keys.ADAPTER)))) for m in trained}
        assert len(trained) == 6 and down == {
            ("1", tuple(sorted(adapter(tmp_path / "run", 0)))),
            ("2", tuple(sent_keys)),
        }
    if "simulation.site-ranks" in flat:
        assert [deltas[1, n].site.rank for n in (1, 2, 3)] == [4, 4, 2]


def is_(msg: Message, kind: str, rnd: int, nodes: Iterable[int]) -> bool:
    meta = msg.metadata
    return meta.message_type == kind and meta.group_id == str(rnd) and meta.dst_node_id in set(nodes)


def crash(kind: str, rnd: int, nodes: Iterable[int]) -> ClientFn:
    """The ClientApp, except that ``nodes`` raise (their site goes down) on round ``rnd``'s ``kind``."""

    def client(msg: Message, context: Context) -> Message:
        if is_(msg, kind, rnd, nodes):
            raise RuntimeError("site went down")
        return client_app(msg, context)

    return client


@pytest.mark.parametrize("stage", ["unmask", "masked"])
def test_a_dropped_client_is_recovered_and_the_result_is_the_survivors_aggregate(
    tiny_model: Path, tmp_path: Path, deltas: dict[tuple[int, int], LocalUpdate], stage: str
) -> None:
    # Prepare: node 2 of 3 drops in round 1, after sending its masked input (its unmask answer never
    # arrives) or before (its site crashes while training)
    if stage == "unmask":

        def grid_fn(n: int) -> LocalGrid:
            return WireGrid(client_app, n, lose=lambda m: is_(m, "query.secagg_unmask", 1, [2]))

    else:

        def grid_fn(n: int) -> LocalGrid:
            return WireGrid(crash("train.secagg", 1, [2]), n)

    # Execute
    rows, _ = federate(tiny_model, tmp_path / "run", {**FAST, "num-server-rounds": 1}, grid_fn)

    # Assert
    row = rows[1]
    assert row["updated"] and [f["node"] for f in row["failures"]] == [2]
    survivors = [1, 2, 3] if stage == "unmask" else [1, 3]
    assert row["replied_nodes"] == survivors
    assert row["secagg"]["recovered"] == ([] if stage == "unmask" else [2])
    assert_round_is_fedavg(tmp_path / "run", 1, row, updates_of(deltas, 1, survivors), adapter(tmp_path / "run", 0))


@pytest.mark.parametrize(
    ("ranks", "crashed", "stage"),
    [((4, 2, 2), [], "before training"), ((4, 4, 2), [2], "before unmasking")],
    ids=["declared", "after-a-dropout"],
)
def test_a_rank_band_under_t_sites_abandons_the_round_before_anything_is_unmasked(
    tiny_model: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    ranks: tuple[int, ...],
    crashed: list[int],
    stage: str,
) -> None:
    # Prepare: each site sets its own rank in node config (the plan checker never sees it); t = 2 of 3 sites.
    # Ranks 4/2/2 leave components 3..4 to node 1 alone; with 4/4/2, node 2 crashes while training.
    def grid_fn(n: int) -> LocalGrid:
        grid = WireGrid(crash("train.secagg", 1, crashed), n)
        for node, rank in zip((1, 2, 3), ranks, strict=True):
            grid.contexts[node].node_config["lora.r"] = rank
        return grid

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedtune.server.secagg_round"):
        rows, grid = federate(tiny_model, tmp_path / "run", {**FAST, "num-server-rounds": 1}, grid_fn)

    # Assert: abandoned, and says why; the global adapter did not move; nobody was asked to unmask
    out, row = tmp_path / "run", rows[1]
    why = f"{stage}: LoRA components 3..4 trained by only 1 site(s) (node 1), fewer than the threshold 2"
    assert row["updated"] is False and row["secagg"]["threshold"] == 2
    assert row["secagg"]["abandoned"].startswith(why), row["secagg"]
    assert any(why in r.getMessage() and "abandoned" in r.getMessage() for r in caplog.records)
    before, after = adapter(out, 0), adapter(out, 1)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    asked = {m.metadata.message_type for m, _ in grid.log}
    assert "query.secagg_unmask" not in asked
    assert ("train.secagg" in asked) == bool(crashed)  # a band thin from the start is refused before training


@pytest.mark.parametrize("how", ["lost-unmask", "crashed-training"])
def test_too_few_survivors_abandon_the_round_cleanly_and_the_run_goes_on(
    tiny_model: Path, tmp_path: Path, how: str
) -> None:
    # Prepare: 3 clients, threshold 2; in round 1 two of them are gone
    if how == "lost-unmask":

        def grid_fn(n: int) -> LocalGrid:
            return WireGrid(client_app, n, lose=lambda m: is_(m, "query.secagg_unmask", 1, [2, 3]))

    else:

        def grid_fn(n: int) -> LocalGrid:
            return WireGrid(crash("train.secagg", 1, [2, 3]), n)

    # Execute
    rows, grid = federate(tiny_model, tmp_path / "run", FAST, grid_fn)

    # Assert: round 1 changed nothing and says why; round 2 ran normally
    out = tmp_path / "run"
    first, second = rows[1], rows[2]
    assert first["updated"] is False and "abandoned" in first["secagg"]
    assert ("cannot rebuild" if how == "lost-unmask" else "sent their masked input") in first["secagg"]["abandoned"]
    assert {f["node"] for f in first["failures"]} == {2, 3}
    before, after = adapter(out, 0), adapter(out, 1)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert second["updated"] and second["replied"] == 3
    assert any(not np.array_equal(after[k], adapter(out, 2)[k]) for k in after)
    if how == "crashed-training":  # nobody was asked to unmask a round that could not finish
        assert not [m for m, _ in grid.log if is_(m, "query.secagg_unmask", 1, [1, 2, 3])]


def test_a_tampered_or_replayed_share_fails_its_recipient_and_the_round_proceeds(
    tiny_model: Path, tmp_path: Path, deltas: dict[tuple[int, int], LocalUpdate]
) -> None:
    # Prepare: node 1's ciphertext for node 2 gets one bit flipped in round 1, and in round 2 is replaced
    # by the round-1 original (a replay)
    kept: dict[str, bytes] = {}

    def alter(msg: Message, reply: Message) -> None:
        if msg.metadata.message_type != "query.secagg_share" or msg.metadata.dst_node_id != 1:
            return
        record = reply.content.config_records[keys.SECAGG]
        ids, blobs = list(record[keys.SA_IDS]), list(record[keys.SA_CIPHERTEXTS])
        i = ids.index(2)
        if msg.metadata.group_id == "1":
            kept["blob"] = blobs[i]
            blobs[i] = blobs[i][:-1] + bytes([blobs[i][-1] ^ 1])
        else:
            blobs[i] = kept["blob"]
        record[keys.SA_CIPHERTEXTS] = blobs

    # Execute
    rows, _ = federate(tiny_model, tmp_path / "run", FAST, lambda n: WireGrid(client_app, n, alter=alter))

    # Assert: AES-GCM rejects the share both times; node 2 is dropped, its masks recovered, the rest aggregated
    for rnd in (1, 2):
        row = rows[rnd]
        assert row["updated"] and row["replied_nodes"] == [1, 3] and row["secagg"]["recovered"] == [2]
        (failure,) = row["failures"]
        assert failure["node"] == 2 and "failed authentication" in failure["reason"]
        assert_round_is_fedavg(
            tmp_path / "run", rnd, row, updates_of(deltas, rnd, [1, 3]), adapter(tmp_path / "run", 0)
        )


ORDER_8 = bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")  # RFC 7748 small order


def test_a_low_order_public_key_fails_its_node_at_the_key_stage_and_the_round_goes_on(
    tiny_model: Path, tmp_path: Path, deltas: dict[tuple[int, int], LocalUpdate]
) -> None:
    # Prepare: node 1 advertises a small-order mask key, with which every agreed key would be all zeros
    # (its neighbours would only meet it when masking, after training; unit tests cover the other keys)
    def alter(msg: Message, reply: Message) -> None:
        if is_(msg, "query.secagg_keys", 1, [1]):
            reply.content.config_records[keys.SECAGG][keys.SA_MASK_KEY] = ORDER_8

    # Execute
    flat = {**FAST, "num-server-rounds": 1}
    rows, grid = federate(tiny_model, tmp_path / "run", flat, lambda n: WireGrid(client_app, n, alter=alter))

    # Assert: node 1 fails the key stage, named; nodes 2 and 3 (t = 2 of 2) finish the round without it
    row = rows[1]
    (failure,) = row["failures"]
    assert failure["node"] == 1
    assert failure["reason"] == (
        "secagg keys: client 1's mask public key is a low-order X25519 point: every key agreed with it is all zeros."
    )
    assert row["updated"] and row["replied_nodes"] == [2, 3] and row["secagg"]["threshold"] == 2
    assert not [m for m, _ in grid.log if is_(m, "query.secagg_share", 1, [1])]  # never asked again
    assert_round_is_fedavg(tmp_path / "run", 1, row, updates_of(deltas, 1, [2, 3]), adapter(tmp_path / "run", 0))


def test_central_dp_noises_the_unmasked_sum_of_client_clipped_deltas(
    tiny_model: Path, tmp_path: Path, deltas: dict[tuple[int, int], LocalUpdate]
) -> None:
    # Prepare: DP-FedAvg with C = 0.05 (every delta is clipped), z = 1, three clients weighted equally
    c, z = 0.05, 1.0
    flat = {
        **FAST,
        "num-server-rounds": 1,
        "privacy.mechanism": "central",
        "privacy.clip-norm": c,
        "privacy.noise-multiplier": z,
        "strategy.weighting": "uniform",
    }

    # Execute
    rows, _ = federate(tiny_model, tmp_path / "run", flat)

    # Assert: moved = (sum of deltas clipped to C - sqrt(L) step + N(0, (zC)^2)) / 3, per entry
    row = rows[1]
    assert row["updated"] and row["replied"] == 3 and np.isfinite(row["epsilon"])
    before, after = adapter(tmp_path / "run", 0), adapter(tmp_path / "run", 1)
    order = sorted(before)
    length = sum(before[k].size for k in order)
    step = 2 * row["secagg"]["clip"] / (2 ** row["secagg"]["quant_bits"] - 1)
    clipped = []
    for n in (1, 2, 3):
        flat_delta = np.concatenate([deltas[1, n].delta[k].astype(np.float64).ravel() for k in order])  # type: ignore[index]
        assert np.linalg.norm(flat_delta) == pytest.approx(c, rel=1e-5)  # the clip at C was active
        clipped.append(flat_delta * (c - np.sqrt(length) * step) / np.linalg.norm(flat_delta))
    moved = np.concatenate([(after[k].astype(np.float64) - before[k]).ravel() for k in order])
    noise = moved - np.sum(clipped, axis=0) / 3
    assert abs(noise.std() / (z * c / 3) - 1) < 0.05
    assert abs(noise.mean()) < 4 * z * c / 3 / np.sqrt(length)
