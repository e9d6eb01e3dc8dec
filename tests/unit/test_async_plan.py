"""The plan checker under ``server.mode = async``: what composes, and one line naming why for what does not."""

from __future__ import annotations

from typing import Any

import pytest

from fedtune.config.plan import Plan
from fedtune.core.errors import ConfigError
from fedtune.privacy import compat
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.strategies import STRATEGIES

ASYNC = {"server.mode": "async", "num-server-rounds": 3, "server.min-clients": 4}


def async_problems(flat: dict[str, Any]) -> list[str]:
    return [p for p in compat.problems(Plan.from_flat({**ASYNC, **flat})) if "`server.mode` = async" in p]


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_weighted_means_compose_and_rules_needing_each_update_are_refused(name: str) -> None:
    # Execute
    found = async_problems({"strategy.name": name})

    # Assert: the fedavg family (a weighted mean plus a server optimizer) runs; every other rule is named
    if STRATEGIES.get(name).individual_updates:
        assert len(found) == 1 and f"`strategy.name` = {name}" in found[0] and found[0].startswith("rounds 1-3: ")
    else:
        assert found == []


@pytest.mark.parametrize("name", MECHANISMS.names())
def test_only_site_accounted_dp_composes(name: str) -> None:
    # Prepare: each mechanism with a noise setting that its own rules accept
    flat: dict[str, Any] = {"privacy.mechanism": name, "privacy.noise-multiplier": 1.0}

    # Execute
    found = async_problems(flat)

    # Assert: none and dp-sgd (each site accounts its own steps) run; central, local, distributed are refused
    if name in ("none", "dp-sgd"):
        assert found == []
    else:
        assert len(found) == 1 and f"`privacy.mechanism` = {name}" in found[0]
    assert name not in ("central", "distributed") or found


def test_secure_aggregation_federated_eval_and_budget_are_refused_naming_the_key() -> None:
    # Execute
    found = async_problems({"secagg.protocol": "secagg", "eval.federated": True, "communication.budget-mb": 5.0})

    # Assert
    assert len(found) == 3
    assert any("`secagg.protocol` = secagg (SecAgg+) needs a fixed cohort" in p for p in found)
    assert any("`eval.federated` = true" in p for p in found)
    assert any("`communication.budget-mb`" in p for p in found)


def test_a_plan_entry_is_refused_for_the_versions_it_covers_only() -> None:
    found = async_problems({"plan.2-.strategy.name": "median"})
    assert len(found) == 1 and found[0].startswith("rounds 2-3: ")


def test_sync_mode_refuses_none_of_these() -> None:
    flat = {**ASYNC, "server.mode": "sync", "strategy.name": "median", "secagg.protocol": "secagg"}
    assert not any("server.mode" in p for p in compat.problems(Plan.from_flat(flat)))


def test_mode_is_fixed_for_the_whole_run() -> None:
    with pytest.raises(ConfigError, match=r"`server\.mode` is fixed for the whole run"):
        Plan.from_flat({"plan.2-.server.mode": "async"})
