"""The round plan: parsing, per-round configs, and the checker's messages naming round and key."""

from __future__ import annotations

import pytest

from fedtune.config.plan import Plan, evaluated_in
from fedtune.core.errors import ConfigError, IncompatibleComponentsError
from fedtune.privacy import compat


def test_for_round_applies_the_covering_entries() -> None:
    # Prepare
    plan = Plan.from_flat(
        {
            "num-server-rounds": 20,
            "plan.4-20.strategy.name": "fedadam",
            "plan.4-20.server.fraction-train": 0.3,
            "plan.10-.train.lr": 1e-4,
            "plan.2.eval.federated": False,
        }
    )

    # Execute
    r1, r2, r5, r12 = (plan.for_round(r) for r in (1, 2, 5, 12))

    # Assert
    assert r1 == plan.base
    assert r2.eval.federated is False and r2.strategy.name == "fedavg"
    assert r5.strategy.name == "fedadam" and r5.server.fraction_train == 0.3 and r5.train.lr == plan.base.train.lr
    assert r12.train.lr == 1e-4 and r12.strategy.name == "fedadam"
    assert plan.table() == [
        ("1", "(base)"),
        ("2", "eval.federated=False"),
        ("3", "(base)"),
        ("4-9", "strategy.name=fedadam, server.fraction-train=0.3"),
        ("10-20", "strategy.name=fedadam, server.fraction-train=0.3, train.lr=0.0001"),
    ]


def test_plan_round_trips_through_flat() -> None:
    plan = Plan.from_flat({"num-server-rounds": 5, "plan.2-3.strategy.name": "median"})
    assert Plan.from_flat(plan.to_flat()) == plan


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"plan.x.train.lr": 1.0}, r"`plan\.x\.train\.lr`: plan keys have the form"),
        ({"plan.5-2.train.lr": 1.0}, r"`plan\.5-2\.train\.lr`: round range '5-2' is empty"),
        ({"plan.2-3.train.lrr": 1.0}, r"`plan\.2-3\.train\.lrr`: unknown config key `train\.lrr`"),
        ({"plan.2.lora.r": 4}, r"`plan\.2\.lora\.r`: `lora\.r` is fixed for the whole run"),
        ({"plan.2-3.train.lr": -1.0}, r"rounds 2-3: `train\.lr` must be > 0"),
        ({"plan.9.train.lr": 1.0}, r"`plan\.9\.train\.lr` starts after the last round \(3\)"),
        ({"plan.1-2.train.lr": 1.0, "plan.2-.train.lr": 2.0}, r"both set `train\.lr` for the same rounds"),
    ],
)
def test_plan_errors_name_round_range_and_key(flat: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Plan.from_flat({"num-server-rounds": 3, **flat})


def test_checker_reports_every_problem_with_its_rounds() -> None:
    # Prepare
    plan = Plan.from_flat(
        {
            "num-server-rounds": 10,
            "server.min-clients": 2,
            "plan.2-4.strategy.name": "krum",
            "plan.6-7.strategy.name": "nope",
            "lora.freeze-a": True,
            "plan.9-.strategy.name": "exact",
        }
    )

    # Execute
    with pytest.raises(IncompatibleComponentsError) as info:
        compat.check(plan)

    # Assert
    text = str(info.value)
    assert (
        "rounds 2-4: `strategy.name` = krum with `strategy.krum-byzantine` = 1 needs `server.min-clients` >= 4" in text
    )
    assert "rounds 6-7: `strategy.name` must be one of" in text
    assert "rounds 9-10: `strategy.name` = exact re-factorizes A, which `lora.freeze-a` keeps fixed" in text


def test_checker_refuses_individual_rules_with_heterogeneous_ranks() -> None:
    plan = Plan.from_flat({"num-server-rounds": 2, "simulation.site-ranks": "8,4", "strategy.name": "median"})
    assert compat.problems(plan) == [
        "rounds 1-2: `strategy.name` = median has no defined rule for heterogeneous ranks "
        "(`simulation.site-ranks`); use a fedavg-family strategy."
    ]


def test_valid_plan_has_no_problems() -> None:
    plan = Plan.from_flat({"num-server-rounds": 4, "server.min-clients": 4, "plan.3-.strategy.name": "krum"})
    assert compat.problems(plan) == []


def test_task_metrics_every_keeps_generation_to_round_0_the_last_round_and_every_nth() -> None:
    # Prepare
    every_0 = Plan.from_flat(
        {"num-server-rounds": 3, "eval.metrics": "loss,exact-match,f1", "eval.task-metrics-every": 0}
    )
    every_2 = Plan.from_flat({"num-server-rounds": 5, "eval.metrics": "rouge-l", "eval.task-metrics-every": 2})
    default = Plan.from_flat({"num-server-rounds": 3, "eval.metrics": "loss,f1"})

    # Execute
    names_0 = [every_0.for_round(r).eval.metric_names() for r in (1, 2, 3)]
    names_2 = [every_2.for_round(r).eval.metric_names() for r in (1, 2, 3, 4, 5)]

    # Assert: round 0 evaluates with the base config, which keeps every metric
    assert every_0.base.eval.metric_names() == ["loss", "exact-match", "f1"]
    assert names_0 == [["loss"], ["loss"], ["loss", "exact-match", "f1"]]
    assert names_2 == [["loss"], ["rouge-l"], ["loss"], ["rouge-l"], ["rouge-l"]]
    assert all(cfg.eval.metric_names() == ["loss", "f1"] for cfg in default.configs())
    # metrics.jsonl's spec says which rounds left the generated metrics out, and only those
    assert [every_0.spec(r).get("eval.metrics") for r in (1, 2, 3)] == ["loss", "loss", None]
    assert all("eval.metrics" not in default.spec(r) for r in (1, 2, 3))


def test_federated_every_keeps_the_sites_evaluation_to_the_rounds_it_names() -> None:
    # Prepare: eval.federated on (no DP), 4 rounds
    def federated(every: int) -> list[bool]:
        plan = Plan.from_flat({"num-server-rounds": 4, "eval.federated": True, "eval.federated-every": every})
        return [evaluated_in(plan.base, 0).eval.federated is True] + [
            plan.for_round(r).eval.federated is True for r in (1, 2, 3, 4)
        ]

    # Execute / Assert: round 0 is the base model's evaluation (loop.py evaluates it with evaluated_in)
    assert federated(1) == [True, True, True, True, True]
    assert federated(0) == [False, False, False, False, True]  # the last round only
    assert federated(3) == [True, False, False, True, True]  # round 0, every 3rd, and the last
    # metrics.jsonl's spec says which rounds skipped the sites' evaluation, and only those
    plan = Plan.from_flat({"num-server-rounds": 3, "eval.federated": True, "eval.federated-every": 0})
    assert [plan.spec(r).get("eval.federated") for r in (1, 2, 3)] == [False, False, None]
    # off stays off: the setting only thins out the rounds eval.federated turns on
    off = Plan.from_flat({"num-server-rounds": 3, "eval.federated": False, "eval.federated-every": 1})
    assert not any(cfg.eval.federated for cfg in off.configs())
    with pytest.raises(ConfigError, match=r"eval.federated-every.*must be >= 0"):
        Plan.from_flat({"eval.federated-every": -1})


def test_task_metrics_every_below_0_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"eval.task-metrics-every.*must be >= 0"):
        Plan.from_flat({"eval.task-metrics-every": -1})
