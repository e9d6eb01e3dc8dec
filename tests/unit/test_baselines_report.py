"""The baselines' headline and table from given scores (both metric directions, with and without a
server held-out set, with a DP federated row), and each site's step count from the round records."""

from __future__ import annotations

import pytest

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.errors import FedtuneError
from fedtune.server.record import RoundRecord
from fedtune.simulations.baselines import site_steps
from fedtune.simulations.baselines_report import build, headline_line, table

SITES = ["site 0", "site 1"]


def _evals(server: bool) -> dict[str, dict[str, dict[str, float]]]:
    """f1 (higher is better) and loss of each model on each set."""
    scores = {
        "base": {"server": (0.20, 2.0), "site 0": (0.10, 2.2), "site 1": (0.30, 1.8)},
        "federated": {"server": (0.50, 1.0), "site 0": (0.60, 0.9), "site 1": (0.35, 1.5)},
        "centralized": {"server": (0.60, 0.8), "site 0": (0.70, 0.7), "site 1": (0.50, 1.1)},
        "local site 0": {"server": (0.30, 1.6), "site 0": (0.40, 1.2)},
        "local site 1": {"server": (0.25, 1.7), "site 1": (0.45, 1.4)},
    }
    return {
        row: {where: {"f1": f1, "loss": loss} for where, (f1, loss) in sets.items() if server or where != "server"}
        for row, sets in scores.items()
    }


def test_headline_on_a_higher_is_better_metric_with_a_server_set() -> None:
    # Prepare
    cfg = RunConfig.from_flat({"eval.metrics": "f1,loss", "baselines": "local,centralized"})

    # Execute
    result = build(cfg, _evals(server=True), SITES, {"site 0": 4, "site 1": 8}, {}, None)

    # Assert: (0.2 - 0.5) / (0.2 - 0.6) = 0.75; federated beats local-only at site 0 only (0.60 > 0.40, 0.35 < 0.45)
    head = result["headline"]
    assert head["metric"] == "f1" and head["recovered"] == pytest.approx(0.75)
    assert (head["sites_federated_beats_local"], head["sites_compared"], head["sites_beaten"]) == (1, 2, ["site 0"])
    local = result["metrics"]["f1"]["server"]["local"]
    assert (local["mean"], local["worst"]) == (pytest.approx(0.275), 0.25)  # worst: the lowest f1
    assert result["metrics"]["loss"]["server"]["local"]["worst"] == 1.7  # worst: the highest loss
    assert "federation recovers 75.0% of the pooled gain" in headline_line(head)
    assert "federated beats local-only on 1 of 2 sites' own held-out sets" in headline_line(head)


def test_headline_without_a_server_set_uses_the_mean_over_the_sites() -> None:
    # Prepare
    cfg = RunConfig.from_flat({"eval.metrics": "loss"})

    # Execute
    result = build(cfg, _evals(server=False), SITES, {}, {}, None)

    # Assert: means base 2.0, federated 1.2, pooled 0.9: (2.0 - 1.2) / (2.0 - 0.9)
    head = result["headline"]
    assert head["on"] == "the sites' held-out splits (mean)"
    assert head["recovered"] == pytest.approx(0.8 / 1.1)
    assert head["sites_federated_beats_local"] == 1  # site 0: 0.9 < 1.2; site 1: 1.5 > 1.4


def test_under_dp_the_federated_row_carries_epsilon_and_the_baselines_are_non_private() -> None:
    # Prepare
    cfg = RunConfig.from_flat({"eval.metrics": "loss"})
    privacy = {"mechanism": "dp-sgd", "unit": "example", "epsilon": 7.91, "delta": 1e-5, "trust": "none"}

    # Execute
    result = build(cfg, _evals(server=True), SITES, {}, {}, privacy)
    text = table(result)

    # Assert
    assert result["privacy"]["federated"] == {"mechanism": "dp-sgd", "unit": "example", "epsilon": 7.91, "delta": 1e-5}
    assert "| federated (dp-sgd, epsilon 7.91, delta 1e-05) | 1.0000 | 0.9000 | 1.5000 |" in text
    assert "| local-only (non-private) | 1.6500 mean, 1.7000 worst | 1.2000 | 1.4000 |" in text
    assert "| centralized (non-private) |" in text and "| base | 2.0000 |" in text


def _plan(backend: str) -> Plan:
    return Plan.from_flat({"simulation.num-supernodes": 3, "simulation.backend": backend, "train.local-steps": 5})


def test_site_steps_count_each_accepted_reply_of_each_round() -> None:
    # Prepare: round 1 sites 0, 1; round 2 sites 1, 2 (site 2's reply in round 1 was rejected)
    history = [
        RoundRecord(round=0),
        RoundRecord(round=1, replied=2, replied_nodes=[1, 2]),
        RoundRecord(round=2, replied=2, replied_nodes=[2, 3]),
    ]

    # Execute / Assert: the shared backend's node k + 1 is site k
    assert site_steps(_plan("shared"), history, "shared") == {0: 5, 1: 10, 2: 5}


def test_under_ray_site_steps_need_every_site_in_every_round() -> None:
    # Prepare: Ray's node ids are random; equal participation is the only case they can be mapped
    equal = [RoundRecord(round=r, replied=3, replied_nodes=[71, 93, 12]) for r in (1, 2)]
    unequal = [*equal, RoundRecord(round=3, replied=2, replied_nodes=[71, 93])]

    # Execute / Assert
    assert site_steps(_plan("ray"), equal, "ray") == {0: 10, 1: 10, 2: 10}
    with pytest.raises(FedtuneError, match=r"rerun with `simulation.backend` = shared"):
        site_steps(_plan("ray"), unequal, "ray")
    with pytest.raises(FedtuneError, match="node ids withheld"):
        site_steps(_plan("shared"), [RoundRecord(round=1, replied=2)], "shared")
