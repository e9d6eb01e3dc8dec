"""Privacy settings that would make a printed epsilon false are refused before round 1, naming rounds
and keys; a site's own budget solves its noise once and declines a round that would overspend; the
trust statement says what amplification and federated evaluation assume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.privacy import compat
from fedtune.privacy import site as site_privacy
from fedtune.privacy.accounting import GaussianEvent, epsilon, noise_multiplier
from fedtune.privacy.ledger import Ledger
from fedtune.privacy.rounds import projected_epsilon, solved_noise
from fedtune.server.report import privacy_summary
from fedtune.server.state import ServerState

CENTRAL = {"privacy.mechanism": "central", "privacy.noise-multiplier": 1.0, "strategy.weighting": "uniform"}


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({**CENTRAL, "strategy.weighting": "examples"}, "needs `strategy.weighting` = uniform"),
        ({**CENTRAL, "strategy.name": "median"}, "`strategy.name` = median under `privacy.mechanism` = central"),
        ({**CENTRAL, "simulation.site-ranks": "2,4"}, "`simulation.site-ranks` under"),
        ({"privacy.mechanism": "local"}, "needs `privacy.noise-multiplier` or `privacy.target-epsilon`"),
        ({**CENTRAL, "privacy.noise-multiplier": 0.0, "privacy.target-epsilon": 3.0}, "makes epsilon infinite"),
        ({"privacy.mechanism": "dp-sgd", "privacy.target-epsilon": 3.0, "strategy.name": "fedprox"}, "fedprox"),
        ({"privacy.clip-on": "server"}, "`privacy.clip-on` = server applies to"),
        ({"privacy.adaptive-clip": True}, "`privacy.adaptive-clip` applies to"),
        ({"server.sampling": "poisson", "server.num-train": 3}, "`server.num-train` fixes the sample size"),
        ({"privacy.target-epsilon": 3.0}, "no round uses DP"),
        (
            {**CENTRAL, "privacy.adaptive-clip": True, "privacy.clip-count-stddev": 0.4},
            "must exceed half of `privacy.noise-multiplier`",
        ),
    ],
)
def test_combinations_that_would_print_a_false_epsilon_are_refused(flat: dict[str, object], needle: str) -> None:
    found = compat.problems(Plan.from_flat({"num-server-rounds": 3, **flat}))
    assert any(needle in line for line in found), found


def test_un_noised_rounds_under_a_budget_are_named_by_round() -> None:
    plan = Plan.from_flat(
        {"num-server-rounds": 5, "privacy.target-epsilon": 4.0, **CENTRAL, "plan.1-2.privacy.mechanism": "none"}
    )
    assert any(line.startswith("rounds 1-2: un-noised updates") for line in compat.problems(plan))


def test_one_run_uses_one_mechanism() -> None:
    plan = Plan.from_flat({"num-server-rounds": 4, **CENTRAL, "plan.3-.privacy.mechanism": "local"})
    assert any("mixes central, local" in line for line in compat.problems(plan))


def test_a_sound_private_plan_passes() -> None:
    plan = Plan.from_flat({"num-server-rounds": 4, **CENTRAL, "privacy.target-epsilon": 8.0, "plan.3-.train.lr": 1e-3})
    assert compat.problems(plan) == []


def test_solved_central_noise_meets_the_target_over_the_plan() -> None:
    flat = {**CENTRAL, "privacy.noise-multiplier": -1.0, "privacy.target-epsilon": 2.0}
    plan = Plan.from_flat({"num-server-rounds": 6, **flat, "server.sampling": "poisson", "server.fraction-train": 0.5})
    z = solved_noise(plan)
    assert z is not None
    reference = epsilon([GaussianEvent(z, 0.5, 6)], 1e-5)  # six rounds at q = 0.5, composed by Opacus
    assert projected_epsilon(plan, z) == pytest.approx(reference, rel=1e-9)
    assert 2.0 * 0.99 <= reference <= 2.0


def test_local_dp_is_accounted_at_half_the_noise_without_amplification() -> None:
    plan = Plan.from_flat({"num-server-rounds": 3, "privacy.mechanism": "local", "privacy.noise-multiplier": 2.0})
    assert projected_epsilon(plan, None) == pytest.approx(epsilon([GaussianEvent(1.0, 1.0, 3)], 1e-5), rel=1e-9)


def test_site_solves_its_noise_once_and_declines_an_overspending_round(tmp_path: Path) -> None:
    cfg = RunConfig().override({"privacy.mechanism": "dp-sgd", "privacy.target-epsilon": 3.0, "train.local-steps": 5})
    budget = site_privacy.SiteBudget(ledger=Ledger())
    state, path = RecordDict(), tmp_path / "site.json"
    spent = []
    for _ in range(6):  # planned for 4 rounds of 5 steps; rounds 5 and 6 must be declined
        spend = site_privacy.plan_round(budget, cfg, sample_rate=0.1, planned_steps=20)
        spent.append(spend.exhausted)
        if not spend.exhausted:
            budget.ledger.add(spend.event)
        site_privacy.save(budget, state, path)
    assert budget.noise_multiplier == pytest.approx(noise_multiplier(3.0, 0.1, 20, 1e-5))
    assert spent == [False, False, False, False, True, True]
    assert budget.ledger.epsilon(1e-5, "rdp") <= 3.0
    # A restarted client (empty context.state) continues from the file; a stale copy never wins.
    restored = site_privacy.restore(RecordDict(), path)
    assert restored.ledger.events == budget.ledger.events
    stale = RecordDict()
    site_privacy.save(
        site_privacy.SiteBudget(ledger=Ledger([GaussianEvent(1.0, 0.1, 5)])), stale, tmp_path / "old.json"
    )
    assert site_privacy.restore(stale, path).steps() == 20


POISSON = {"server.sampling": "poisson", "server.fraction-train": 0.5}


@pytest.mark.parametrize(
    ("flat", "in_trust", "not_in_trust", "in_covers"),
    [
        (
            {**CENTRAL, **POISSON},
            ["q = 0.5", "OS entropy", "`output.log-participants` = false"],
            ["metrics.jsonl"],
            "federated evaluation is off",
        ),
        (
            {**CENTRAL, **POISSON, "output.log-participants": True, "eval.federated": True},
            ["`output.log-participants` = true", "stay secret from the adversary"],
            [],
            "(`eval.federated` = true) reports without noise",
        ),
        ({**CENTRAL, "eval.federated": True}, [], ["log-participants"], "(`eval.federated` = true)"),
        ({"privacy.mechanism": "local", "privacy.noise-multiplier": 1.0}, [], ["participants"], "is off"),
    ],
)
def test_the_trust_statement_names_what_amplification_and_federated_evaluation_assume(
    flat: dict[str, object], in_trust: list[str], not_in_trust: list[str], in_covers: str
) -> None:
    # Prepare
    plan = Plan.from_flat({"num-server-rounds": 2, **flat})

    # Execute
    section = privacy_summary(plan, ServerState(round=0, global_arrays={}, rng=np.random.default_rng()))

    # Assert
    assert all(text in section["trust"] for text in in_trust), section["trust"]
    assert not any(text in section["trust"] for text in not_in_trust), section["trust"]
    assert in_covers in section["covers"], section["covers"]
    # the per-round counts are released in the clear: the statement must say the guarantee does not cover them
    assert "`sampled`, `replied`, `failed`" in section["covers"].split("Not covered:")[1], section["covers"]
