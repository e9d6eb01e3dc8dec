"""Privacy end to end on the tiny preset (real server loop, real ClientApp, shared backend).

Every epsilon the run reports is recomputed here with Opacus's own accountant from the mechanism's
parameters, never copied from fedtune's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from opacus.accountants import RDPAccountant

from fedtune.client.app import app as client_app
from fedtune.client.site import open_site
from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.server.app import run_server
from fedtune.simulations.local import LocalGrid
from fedtune.wire import keys
from fedtune.wire.records import read_arrays

DELTA = 1e-5


def opacus_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=DELTA))


class MetricsGrid(LocalGrid):
    """The shared backend, keeping each train reply's metrics by node (a fresh grid = restarted clients)."""

    def __init__(self, num_sites: int) -> None:
        super().__init__(client_app, num_sites)
        self.metrics: dict[int, list[dict[str, Any]]] = {}

    def _handle(self, msg: Message) -> Message:
        reply = super()._handle(msg)
        if msg.metadata.message_type.startswith("train") and reply.has_content():
            node = msg.metadata.dst_node_id
            metrics = dict(reply.content.metric_records[keys.METRICS])
            if keys.DELTA in reply.content.array_records:
                flat = np.concatenate([a.ravel() for a in read_arrays(reply.content, keys.DELTA).values()])
                metrics["delta-std"] = float(flat.std())
            self.metrics.setdefault(node, []).append(metrics)
        return reply


def make_plan(tiny_model: Path, out: Path, flat: dict[str, Any]) -> Plan:
    return Plan.from_flat(
        {
            **preset("tiny"),
            "model.name": str(tiny_model),
            "output.dir": str(out),
            "simulation.backend": "shared",
            **flat,
        }
    )


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_central_budget_stops_before_it_would_be_exceeded_and_says_so(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: z = 1.2 on every client each round (q = 1); the target lies between rounds 2 and 3
    eps = [opacus_epsilon([(1.2, 1.0, r)]) for r in (1, 2, 3)]
    target = (eps[1] + eps[2]) / 2
    flat = {
        "num-server-rounds": 4,
        "privacy.mechanism": "central",
        "privacy.noise-multiplier": 1.2,
        "privacy.clip-norm": 0.05,
        "privacy.target-epsilon": target,
        "strategy.weighting": "uniform",
    }
    out = tmp_path / "run"

    # Execute
    run_server(make_plan(tiny_model, out, flat), MetricsGrid(3))

    # Assert: two rounds ran, each reporting Opacus's epsilon; round 3 was never started
    history = rows(out)
    assert [r["round"] for r in history] == [0, 1, 2]
    assert [r["epsilon"] for r in history[1:]] == pytest.approx(eps[:2], rel=1e-6)
    assert all(r["epsilon"] <= target for r in history)
    summary = json.loads((out / "summary.json").read_text())["privacy"]
    assert "stopped before round 3" in summary["stopped"] and "`privacy.target-epsilon`" in summary["stopped"]
    assert summary["guarantee_holds"] is True and summary["epsilon"] == pytest.approx(eps[1], rel=1e-6)
    assert summary["unit"].startswith("user-level")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_central_dp_with_poisson_sampling_keeps_who_took_part_and_site_seconds_out_of_every_output(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Prepare: central DP with Poisson sampling (amplification claimed), federated evaluation turned on
    flat = {
        "privacy.mechanism": "central",
        "privacy.noise-multiplier": 1.0,
        "privacy.clip-norm": 0.05,
        "strategy.weighting": "uniform",
        "server.sampling": "poisson",
        # q < 1 claims amplification; the sample is drawn from OS entropy, so q near 1 keeps every round
        # from sampling nobody (at 0.5, one run in four had a round with no site)
        "server.fraction-train": 0.99,
        "eval.federated": True,
        "eval.centralized": False,
    }
    out = tmp_path / "run"
    grid = MetricsGrid(3)

    # Execute: two tiny rounds
    run_server(make_plan(tiny_model, out, flat), grid)

    # Assert: replies carry no seconds, and the round time has no per-site part
    assert grid.metrics and all(not k.startswith("time-") for ms in grid.metrics.values() for m in ms for k in m)
    history = rows(out)
    assert [r["round"] for r in history] == [0, 1, 2]
    participants = {"sampled_nodes", "replied_nodes", "bytes_per_client"}
    for row in history[1:]:
        assert not participants & set(row) and all("node" not in f for f in row["failures"])
        assert "round_trip" in row["time"] and not {"load", "train", "serialize"} & set(row["time"])
    summary = json.loads((out / "summary.json").read_text())
    assert not participants & set(summary["final"])
    assert "`output.log-participants` = false" in summary["privacy"]["trust"]
    assert "(`eval.federated` = true) reports without noise" in summary["privacy"]["covers"]
    saved = json.loads((out / "checkpoints" / "round-002" / "state.json").read_text())
    assert "rng" not in saved and "node_ranks" not in saved
    assert json.loads((out / "sites.json").read_text())["sites"]  # federated evaluation ran


def test_dpsgd_sites_that_spent_their_budget_decline_and_are_not_sampled_again(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: each site's q = batch / its size; the target lets every site train round 1 and lets
    # the site with the largest q fail round 2.
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))
    flat = {
        "num-server-rounds": 3,
        "privacy.mechanism": "dp-sgd",
        "privacy.noise-multiplier": 1.0,
        "train.local-steps": 3,
        "train.batch-size": 8,
        "server.min-clients": 1,
    }
    plan = make_plan(tiny_model, tmp_path / "x", flat)
    cfg = plan.base
    sizes = {pid + 1: len(open_site(cfg, {keys.PARTITION_ID: pid, keys.NUM_PARTITIONS: 3}).train) for pid in range(3)}
    q = {node: min(1.0, 8 / n) for node, n in sizes.items()}
    after = {node: [opacus_epsilon([(1.0, q[node], 3 * r)]) for r in (1, 2, 3)] for node in q}
    greedy = max(q, key=lambda n: q[n])
    target = (after[greedy][0] + after[greedy][1]) / 2
    assert all(a[0] <= target for a in after.values())
    out = tmp_path / "run"
    grid = MetricsGrid(3)

    # Execute
    run_server(make_plan(tiny_model, out, {**flat, "privacy.target-epsilon": target}), grid)

    # Assert
    history = rows(out)
    declined = {n for n, a in after.items() if a[1] > target}
    assert greedy in declined
    assert set(history[2].get("budget_exhausted_nodes", [])) == declined
    assert not declined & set(history[3]["sampled_nodes"])  # never sampled again
    for node, replies in grid.metrics.items():
        trained = [m for m in replies if m.get(keys.BUDGET_EXHAUSTED) != 1]
        assert [m[keys.EPSILON] for m in trained] == pytest.approx(after[node][: len(trained)], rel=1e-6)
        assert all(m[keys.EPSILON] <= target for m in replies)
        assert keys.TRAIN_LOSS not in replies[0]  # a clear-text training loss would leak
    summary = json.loads((out / "summary.json").read_text())["privacy"]
    assert summary["unit"].startswith("sample-level") and summary["sites_exhausted"] == sorted(declined)


def test_site_epsilon_continues_across_a_client_restart_and_a_server_resume(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two dp-sgd rounds with a solved noise multiplier (target 6 over 3 planned rounds)
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))
    flat = {"num-server-rounds": 2, "privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 0.9}
    out = tmp_path / "run"
    run_server(make_plan(tiny_model, out, flat), MetricsGrid(3))
    first = rows(out)

    # Execute: new clients (empty context state) and a resumed server with one more round
    grid = MetricsGrid(3)
    run_server(make_plan(tiny_model, out, {**flat, "num-server-rounds": 3}), grid, resume=True)

    # Assert: round 3's epsilon composes all three rounds at every site
    cfg: RunConfig = make_plan(tiny_model, out, flat).base
    steps = cfg.train.local_steps
    for node, replies in grid.metrics.items():
        n = len(open_site(cfg, {keys.PARTITION_ID: node - 1, keys.NUM_PARTITIONS: 3}).train)
        q = min(1.0, cfg.train.batch_size / n)
        assert replies[-1][keys.EPSILON] == pytest.approx(opacus_epsilon([(0.9, q, 3 * steps)]), rel=1e-6)
    history = rows(out)
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert history[3]["epsilon"] > first[2]["epsilon"]
    assert json.loads((out / "summary.json").read_text())["run_id"]


@pytest.mark.parametrize("mechanism", ["dp-sgd", "local"])
def test_a_site_sets_its_own_dpsgd_noise_and_only_under_dpsgd(
    mechanism: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))
    grid = MetricsGrid(2)
    grid.contexts[1].node_config["privacy.noise-multiplier"] = 3.0  # this site's own choice
    flat = {
        "num-server-rounds": 1,
        "simulation.num-supernodes": 2,
        "privacy.mechanism": mechanism,
        "privacy.noise-multiplier": 0.7,
        "privacy.clip-norm": 1e-4,  # local: the delta is then almost only noise, of std 0.7 * C
    }
    run_server(make_plan(tiny_model, tmp_path / "run", flat), grid)
    if mechanism == "dp-sgd":
        assert grid.metrics[1][0][keys.NOISE_MULTIPLIER] == 3.0 and grid.metrics[2][0][keys.NOISE_MULTIPLIER] == 0.7
    else:  # the server accounts for local DP: a site's own privacy keys do not apply
        assert rows(tmp_path / "run")[1]["epsilon"] == pytest.approx(opacus_epsilon([(0.35, 1.0, 1)]), rel=1e-6)
        for node in (1, 2):
            assert grid.metrics[node][0]["delta-std"] == pytest.approx(0.7 * 1e-4, rel=0.05)
