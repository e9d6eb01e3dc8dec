"""The typed round record: metrics.jsonl keeps its documented field names, and a checkpoint history written
before the record existed reads back, resumes and is written back unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config.plan import Plan
from fedtune.server import checkpoint, loop, traffic
from fedtune.server.record import RoundRecord
from fedtune.server.report import Reporter
from fedtune.server.state import ServerState
from tests.unit.test_loop import GLOBAL, FakeGrid, honest, write_weights

# README, Outputs: `OUT/metrics.jsonl`'s fields of a plain round with federated evaluation (no DP, no
# SecAgg+, no task metrics), plus `updated` (whether the round changed the global adapter)
ROUND_0 = [
    "round", "sampled", "replied", "failed", "train_loss", "eval_loss", "eval_loss_central", "eval_loss_federated",
    "epsilon", "bytes_up", "bytes_down", "bytes_per_client", "seconds", "time", "sites_eval",
]  # fmt: skip
ROUND_N = [*ROUND_0, "sampled_nodes", "replied_nodes", "failures", "spec", "updated", "idle_seconds"]

# Rounds as metrics.jsonl and the checkpoints' history held them before RoundRecord (written by that code)
OLD_ROUNDS: list[dict[str, Any]] = [
    {
        "round": 1, "sampled": 4, "sampled_nodes": [1, 2, 3, 4],
        "spec": {"strategy.name": "fedavg", "privacy.mechanism": "none", "secagg.protocol": "none"},
        "time": {"load": 1.0, "train": 2.0, "serialize": 0.5, "transport": 0.25, "server_serialize": 0.1,
                 "aggregate": 0.2, "eval": 0.3},
        "bytes_up": 640, "bytes_down": 2560,
        "bytes_per_client": {"1": {"up": 320, "down": 640}, "2": {"up": 320, "down": 640},
                             "3": {"up": 0, "down": 640}, "4": {"up": 0, "down": 640}},
        "replied": 2, "failed": 1, "failures": [{"node": 4, "reason": "client error: client 4 broke"}],
        "replied_nodes": [1, 2], "budget_exhausted_nodes": [3],
        "data_checks": {"1": {"malformed": 1, "empty": 1, "duplicates": 1, "too_long": 1}},
        "train_loss": 2.0, "exact_reconstruction_error": 0.125, "updated": True,
        "sites_eval": {"1": {"num_examples": 10, "eval_loss": 1.0, "num_generated": 4, "exact_match": 0.5,
                             "rouge_l": 0.1}},
        "eval_loss_central": 0.25, "eval_loss_federated": 0.52, "eval_loss": 0.25,
        "rouge_l_central": 0.5, "rouge_l_federated": 0.25, "rouge_l": 0.5,
        "exact_match_central": None, "exact_match_federated": 0.5, "exact_match": 0.5,
        "seconds": 3.5, "epsilon": None,
    },
    {
        "round": 2, "sampled": 3, "spec": {"strategy.name": "fedavg", "privacy.mechanism": "central"},
        "time": {"round_trip": 1.0, "server_serialize": 0.1, "aggregate": 0.2, "eval": 0.3},
        "bytes_up": 960, "bytes_down": 960, "replied": 3, "failed": 1,
        "failures": [{"reason": "client error: client <node> ran out of memory"}],
        "train_loss": None, "clip_norm": 1.0, "clip_norm_next": 0.938, "unclipped_share_noised": 0.81,
        "updated": True, "eval_loss_central": None, "eval_loss_federated": None, "eval_loss": None,
        "seconds": 1.5, "epsilon": "inf",
    },
    {
        "round": 3, "sampled": 3, "sampled_nodes": [1, 2, 3], "replied": 2, "failed": 1,
        "failures": [{"node": 2, "reason": "secagg masked: no reply within 5 s"}],
        "bytes_up": 4700, "bytes_down": 5200, "replied_nodes": [1, 3], "train_loss": None, "updated": True,
        "secagg": {
            "stages": {"keys": {"seconds": 0.1, "clients": 3, "answered": 3, "bytes_down": 0, "bytes_up": 192,
                                "bytes_down_per_client": 0.0, "bytes_up_per_client": 64.0}},
            "degree": 2, "threshold": 2, "quant_bits": 16, "modulus_bits": 24, "clip": 0.05, "survivors": 2,
            "recovered": [2],
            "distributed": {"scale": 655360.0, "l1": 9.0, "l2": 3.0, "min_survivors": 2, "mu_share": 4.5,
                            "mu_target": 9.0, "mu_released": 9.0, "noise_std_of_mean": 0.01},
            "dropped": [2],
        },
        "eval_loss_central": 1.0, "eval_loss_federated": None, "eval_loss": 1.0, "time": {"eval": 0.2},
        "seconds": 2.0, "epsilon": 3.2,
    },
]  # fmt: skip


def test_a_tiny_runs_metrics_jsonl_has_exactly_the_documented_fields(task_identity: None, tmp_path: Path) -> None:
    # Prepare
    plan = Plan.from_flat({"num-server-rounds": 2, "server.min-clients": 3})
    reporter = Reporter(tmp_path)
    state = ServerState(round=0, global_arrays=dict(GLOBAL), rng=np.random.default_rng(0))

    # Execute: the loop's records, written as the server app writes them
    loop.run(plan, FakeGrid([1, 2, 3], honest), state, evaluate=lambda a, c: {}, on_round=lambda s, r: reporter.row(r))

    # Assert
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [sorted(ROUND_0), sorted(ROUND_N), sorted(ROUND_N)]


def test_an_old_history_entry_reads_back_typed_and_writes_back_unchanged() -> None:
    # Execute
    records = [RoundRecord.from_json(entry) for entry in OLD_ROUNDS]

    # Assert: the same objects back (key order aside), and each field typed
    assert [r.to_json() for r in records] == OLD_ROUNDS
    plain, central, secure = records
    assert plain.bytes_per_client is not None and plain.bytes_per_client[3].down == 640
    assert (
        plain.failures is not None
        and plain.failures[0].node == 4
        and plain.data_checks == {1: OLD_ROUNDS[0]["data_checks"]["1"]}
    )
    assert (
        plain.score("loss") == 0.25 and plain.scores["rouge-l"].federated == 0.25 and plain.score("exact-match") == 0.5
    )
    assert plain.aggregator == {"exact_reconstruction_error": 0.125} and not plain.unknown
    assert central.epsilon == math.inf and central.clip_norm_next == 0.938 and central.score("loss") is None
    assert secure.secagg is not None and secure.secagg.distributed is not None
    assert secure.secagg.distributed.mu_released == 9.0 and secure.secagg.recovered == [2]


def test_a_run_resumes_from_a_checkpoint_whose_history_the_old_code_wrote(task_identity: None, tmp_path: Path) -> None:
    # Prepare: a round-1 checkpoint, its history replaced by an entry of the old shape
    plan = Plan.from_flat({"num-server-rounds": 2, "server.min-clients": 3, "communication.budget-mb": 1.0})
    state = ServerState(round=1, global_arrays=dict(GLOBAL), rng=np.random.default_rng(0))
    checkpoint.save(tmp_path, state, plan, write_weights)
    path = checkpoint.latest(tmp_path) / checkpoint.STATE_FILE
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "history": [OLD_ROUNDS[0]]}))
    saved: list[dict[str, Any]] = []

    def on_round(s: ServerState, record: RoundRecord) -> None:
        checkpoint.save(tmp_path, s, plan, write_weights)
        saved.extend(json.loads((checkpoint.latest(tmp_path) / checkpoint.STATE_FILE).read_text())["history"])

    # Execute
    resumed = checkpoint.load(checkpoint.latest(tmp_path))
    resumed = loop.run(plan, FakeGrid([1, 2, 3], honest), resumed, evaluate=lambda a, c: {}, on_round=on_round)

    # Assert: round 2 ran, the totals count the old round's bytes, and the old entry is written back as it was
    assert resumed.round == 2 and [r.round for r in resumed.history] == [1, 2]
    assert traffic.communication_summary(plan.base, resumed)["bytes_up"] == 640 + resumed.history[1].bytes_up
    assert saved[0] == OLD_ROUNDS[0] and saved[1]["round"] == 2 and saved[1]["updated"] is True
