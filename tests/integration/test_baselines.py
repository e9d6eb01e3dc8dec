"""Baselines in the same run (``baselines = local,centralized``): local-only and centralized training
after a real tiny federation on the in-process ``shared`` backend.

References come from outside the baselines code: the steps each site reported in its own train
replies (seen by a wrapper around the real ClientApp), and the run's own ``metrics.jsonl`` and
``summary.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, MessageType

from fedtune.cli import main
from fedtune.client.app import app as client_app
from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.core.errors import ConfigError
from fedtune.privacy import compat
from fedtune.server.app import run_server
from fedtune.simulations.baselines import run_baselines
from fedtune.simulations.local import LocalGrid
from fedtune.wire import keys

SITES = 3


def _flat(tiny_model: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        **preset("tiny"),
        "model.name": str(tiny_model),
        "output.dir": str(out),
        "simulation.backend": "shared",
        "simulation.num-supernodes": SITES,
        "baselines": "local,centralized",
        **extra,
    }


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_local_only_steps_match_each_site_and_the_headline_recomputes(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: 2 of 3 sites per round, so the sites train different numbers of steps; count the steps
    # each site's own reply says it took
    out = tmp_path / "run"
    plan = Plan.from_flat(_flat(tiny_model, out, **{"server.fraction-train": 0.5, "num-server-rounds": 3}))
    reported = dict.fromkeys(range(1, SITES + 1), 0)

    def client(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and reply.has_content():
            reported[msg.metadata.dst_node_id] += int(reply.content.metric_records[keys.METRICS][keys.STEPS])
        return reply

    run_server(plan, LocalGrid(client, SITES))

    # Execute
    result = run_baselines(plan, out)

    # Assert: local-only steps = what each site did; centralized = all of them together
    saved = json.loads((out / "baselines.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert len(set(reported.values())) > 1  # the case under test: unequal participation
    expected = {f"site {node - 1}": steps for node, steps in reported.items()}
    assert saved["steps"]["local"] == expected == saved["steps"]["federated"]
    assert saved["steps"]["centralized"] == sum(reported.values())
    # the base and federated rows are the run's own round-0 and final evaluations
    rows = _rows(out)
    loss = saved["metrics"]["loss"]
    assert loss["server"]["base"] == pytest.approx(rows[0]["eval_loss_central"], abs=1e-9)
    assert loss["server"]["federated"] == pytest.approx(rows[-1]["eval_loss_central"], abs=1e-9)
    for node, entry in rows[-1]["sites_eval"].items():
        assert loss["sites"][f"site {int(node) - 1}"]["federated"] == pytest.approx(entry["eval_loss"], abs=1e-9)
    # the headline, recomputed from metrics.jsonl and the pooled value in baselines.json
    base, fed, pooled = rows[0]["eval_loss_central"], rows[-1]["eval_loss_central"], loss["server"]["centralized"]
    head = saved["headline"]
    assert head["recovered"] == pytest.approx((base - fed) / (base - pooled), abs=1e-9)
    beats = sum(
        entry["eval_loss"] < loss["sites"][f"site {int(node) - 1}"]["local"]
        for node, entry in rows[-1]["sites_eval"].items()
    )
    assert (head["sites_federated_beats_local"], head["sites_compared"]) == (beats, SITES)
    local = loss["server"]["local"]
    assert local["worst"] == max(local["sites"].values())
    assert local["mean"] == pytest.approx(sum(local["sites"].values()) / SITES)
    assert (out / "plots" / "baselines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_with_baselines_under_dp_prints_the_headline_and_marks_the_baselines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    out = tmp_path / "run"
    argv = ["simulate", "--preset", "tiny", "--out", str(out), "--rounds", "1", "--baselines", "local,centralized"]
    for setting in (
        "simulation.backend=shared",
        "privacy.mechanism=central",
        "strategy.weighting=uniform",
        "privacy.noise-multiplier=0.8",
    ):
        argv += ["--set", setting]

    # Execute: fedtune's logger does not propagate (its own stderr handler); listen on it directly
    fedtune_log = logging.getLogger("fedtune")
    fedtune_log.addHandler(caplog.handler)
    try:
        status = main(argv)
    finally:
        fedtune_log.removeHandler(caplog.handler)

    # Assert: the federated row carries the run's epsilon; the baselines say they are not private
    assert status == 0
    saved = json.loads((out / "baselines.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert saved["privacy"]["federated"]["epsilon"] == summary["privacy"]["epsilon"] > 0
    assert saved["privacy"]["baselines"].startswith("non-private")
    eps = f"epsilon {summary['privacy']['epsilon']:.2f}"
    assert f"| federated (central, {eps}, delta 1e-05) |" in caplog.text
    assert "| centralized (non-private) |" in caplog.text and "| local-only (non-private) |" in caplog.text
    head = saved["headline"]
    share = (head["base"] - head["federated"]) / (head["base"] - head["pooled"])
    assert f"federation recovers {share:.1%} of the pooled gain" in caplog.text
    assert f"federated beats local-only on {head['sites_federated_beats_local']} of {SITES} sites" in caplog.text
    assert saved["steps"]["centralized"] == SITES * 4  # every site, 1 round of the tiny preset's 4 steps


def test_an_unknown_baseline_is_one_line_naming_the_key(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`baselines` has unknown baseline\(s\) 'pooled'; known: local, centralized"):
        RunConfig.from_flat({"baselines": "local,pooled"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"simulation.backend": "ray", "server.fraction-train": 0.5}, r"needs every site sampled every round"),
        (
            {
                "privacy.mechanism": "central",
                "privacy.noise-multiplier": 1.0,
                "server.sampling": "poisson",
                "server.fraction-train": 0.5,
                "strategy.weighting": "uniform",
            },
            r"set `output.log-participants` = true",
        ),
    ],
)
def test_runs_whose_outputs_hide_each_sites_steps_are_refused_before_round_1(
    tiny_model: Path, tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    plan = Plan.from_flat(_flat(tiny_model, tmp_path / "run", **extra))
    with pytest.raises(ConfigError, match=message):
        compat.check(plan)


def test_simulate_refuses_an_unknown_baseline_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    status = main(["simulate", "--preset", "tiny", "--out", str(tmp_path / "run"), "--baselines", "local,solo"])

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and err[-1] == (
        "fedtune: error: `baselines` has unknown baseline(s) 'solo'; known: local, centralized."
    )
    assert not (tmp_path / "run").exists()
