"""Buffered asynchronous rounds (``server.mode = async``) end to end on the tiny preset: the real server and
the real ClientApp on the ``shared`` backend with one slowed site, and a killed and resumed run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message
from safetensors.numpy import load_file

from fedtune.client.app import app as client_app
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.privacy import compat
from fedtune.server import checkpoint
from fedtune.server.app import run_server
from fedtune.server.checkpoint import saved_plan
from fedtune.simulations.local import LocalGrid
from fedtune.strategies import make_optimizer
from fedtune.wire import keys
from fedtune.wire.records import read_arrays
from tests.integration.test_simulation import fedtune

ADAPTER = "adapter_model.safetensors"


def async_plan(tiny_model: Path, out: Path, flat: dict[str, Any]) -> Plan:
    plan = Plan.from_flat(
        {
            **preset("tiny"),
            "model.name": str(tiny_model),
            "output.dir": str(out),
            "simulation.backend": "shared",
            "server.mode": "async",
            "server.buffer-size": 2,
            **flat,
        }
    )
    compat.check(plan)
    return plan


def rows_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fast_sites_contribute_more_versions_than_a_slow_one(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: partition 2 (node 3) waits 3 s per local step (12 s a turn); the others take about a second
    plan = async_plan(tiny_model, tmp_path / "run", {"num-server-rounds": 4, "simulation.site-delays": "0,0,3"})

    # Execute
    run_server(plan, LocalGrid(client_app, 3))

    # Assert: one row per version with its contributors, their staleness and every site's idle seconds
    rows = rows_of(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4] and [r["version"] for r in rows[1:]] == [1, 2, 3, 4]
    for row in rows[1:]:
        assert len(row["contributors"]) == 2 and set(row["idle_seconds"]) == {"1", "2", "3"}
        assert row["bytes_up"] > 0 and row["train_loss"] is not None and row["eval_loss"] is not None
        for c in row["contributors"]:
            assert 0 <= c["staleness"] < row["version"]
    counts = Counter(c["node"] for r in rows[1:] for c in r["contributors"])
    assert counts[1] > counts[3] and counts[2] > counts[3]
    # the round table (rounds.md, as on the console) shows each version, its contributors and idle seconds
    table = (tmp_path / "run" / "rounds.md").read_text().splitlines()
    assert table[0].startswith("| round | version | contributors | idle |")
    for row, line in zip(rows[1:], table[3:], strict=True):
        shown = " ".join(f"{c['node']}@{c['staleness']}" for c in row["contributors"])
        assert line.startswith(f"| {row['round']} | {row['version']} | {shown} | ")


def test_resume_continues_from_the_checkpointed_version_and_optimizer_state(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: fedadam (its moments must come back); the server "dies" at the first site's turn after version 2
    out = tmp_path / "killed"
    flat = {"num-server-rounds": 4, "strategy.name": "fedadam", "strategy.server-lr": 0.01, "seed": 5}
    plan = async_plan(tiny_model, out, flat)

    def dies_in_version_3(msg: Message, context: Context) -> Message:
        if checkpoint.round_dir(out, 2).exists():
            raise KeyboardInterrupt  # not caught by the grid: the server process "dies"
        return client_app(msg, context)

    with pytest.raises(KeyboardInterrupt):
        run_server(plan, LocalGrid(dies_in_version_3, 3))
    saved = checkpoint.load(checkpoint.latest(out))
    assert saved.round == 2 and saved.optimizer_states

    # Execute: resume, keeping what each site is sent and what it answers
    sent: list[tuple[Message, dict[str, np.ndarray], dict[str, np.ndarray], int]] = []

    def recording(msg: Message, context: Context) -> Message:
        received = read_arrays(msg.content, keys.ADAPTER)
        reply = client_app(msg, context)
        delta = read_arrays(reply.content, keys.DELTA)
        examples = int(reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES])
        kept = {k: v.copy() for k, v in delta.items()}
        sent.append((msg, {k: v.copy() for k, v in received.items()}, kept, examples))
        return reply

    resumed = Plan.from_flat(saved_plan(out))
    run_server(resumed, LocalGrid(recording, 3), resume=True)

    # Assert: every site restarts from version 2 (in-flight work was lost) ...
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    first = [s for s in sent if s[0].metadata.group_id == "3"][:3]
    assert sorted(s[0].metadata.dst_node_id for s in first) == [1, 2, 3]
    for _, received, _, _ in first:
        for key, value in saved.global_arrays.items():
            np.testing.assert_array_equal(received[key], value, err_msg=key)
    # ... and version 3 is FedAdam's step from version 2 with its restored moments over the first two
    # replies (staleness 0: constant weight), example-weighted
    assert rows[3]["contributors"] == [{"node": 1, "staleness": 0}, {"node": 2, "staleness": 0}]
    parts = first[:2]
    total = sum(n for *_, n in parts)
    mean = {k: sum(d[k].astype(np.float64) * n for _, _, d, n in parts) / total for k in parts[0][2]}
    optimizer = make_optimizer(resumed.for_round(3).strategy)
    optimizer.load_state_dict(saved.optimizer_states["adam"])
    expected = optimizer.step({k: saved.global_arrays[k] for k in mean}, mean)
    version3 = checkpoint.load(checkpoint.round_dir(out, 3)).global_arrays
    for key, value in expected.items():
        np.testing.assert_allclose(version3[key], value, rtol=0, atol=1e-6, err_msg=key)
    final = load_file(str(out / "adapter" / ADAPTER))
    assert set(final) == set(saved.global_arrays)


def test_async_on_flowers_ray_engine_with_a_site_that_sleeps(tmp_path: Path) -> None:
    # Prepare: `fedtune simulate` as a user runs it; partition 2 sleeps 5 s per local step (20 s a turn)
    out = tmp_path / "ray"
    sets = ["server.mode=async", "server.buffer-size=2", "simulation.site-delays=0,0,5"]
    args = [arg for s in sets for arg in ("--set", s)]

    # Execute
    proc = fedtune("simulate", "--preset", "tiny", "--out", str(out), "--rounds", "3", "--clients", "3", *args)

    # Assert: three versions of two replies each; the sleeping site contributes least
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(out)
    assert [r.get("version") for r in rows[1:]] == [1, 2, 3]
    assert all(len(r["contributors"]) == 2 for r in rows[1:])
    nodes = set(rows[1]["idle_seconds"])
    counts = Counter(str(c["node"]) for r in rows[1:] for c in r["contributors"])
    assert len(nodes) == 3 and min(counts[n] for n in nodes) < max(counts.values())


def test_dp_sgd_runs_unchanged_each_site_accounting_its_own_turns(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    flat = {"num-server-rounds": 3, "privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0}
    plan = async_plan(tiny_model, tmp_path / "dp", flat)

    # Execute
    run_server(plan, LocalGrid(client_app, 3))

    # Assert: three versions; every contributing site reported its own (finite) epsilon to the server
    rows = rows_of(tmp_path / "dp")
    assert [r.get("version") for r in rows[1:]] == [1, 2, 3]
    sites = json.loads((tmp_path / "dp" / "summary.json").read_text())["privacy"]["sites"]
    turns = Counter(str(c["node"]) for r in rows[1:] for c in r["contributors"])
    assert set(turns) <= set(sites) and all(0 < float(sites[n]) < float("inf") for n in turns)
    assert all(r["train_loss"] is None for r in rows[1:])  # under DP no site sends a clear-text loss
