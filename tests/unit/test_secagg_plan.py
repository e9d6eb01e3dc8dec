"""Secure aggregation in the plan: what the checker refuses under it, and parameters that hold for any N."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.errors import ConfigError, IncompatibleComponentsError
from fedtune.privacy import compat
from fedtune.privacy.secagg import settings
from fedtune.privacy.secagg.graph import check_params, neighbours
from fedtune.strategies import STRATEGIES

SECAGG = {"secagg.protocol": "secagg"}
CENTRAL = {"privacy.mechanism": "central", "privacy.noise-multiplier": 1.0, "strategy.weighting": "uniform"}


def problems(flat: dict[str, Any]) -> list[str]:
    return compat.problems(Plan.from_flat({"num-server-rounds": 2, **flat}))


@pytest.mark.parametrize("name", [n for n in STRATEGIES.names() if STRATEGIES.get(n).individual_updates])
def test_rules_that_need_each_update_are_refused_under_secagg(name: str) -> None:
    # Execute
    found = problems({**SECAGG, "strategy.name": name, "server.min-clients": 6})
    # Assert
    assert any(f"`strategy.name` = {name} needs each update" in p for p in found), found


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({**CENTRAL, "privacy.clip-on": "server"}, "`privacy.clip-on` = server"),
        ({**CENTRAL, "privacy.adaptive-clip": True}, "`privacy.adaptive-clip` needs each client's clipped bit"),
        ({"server.max-update-norm": 5.0}, "`server.max-update-norm` cannot check one update"),
        ({"server.min-clients": 1, "server.min-replies": 1}, "needs at least 2 clients"),
        ({"secagg.threshold": 3}, "threshold must be a strict majority"),  # 2 clients: holders 2, t <= 2
        ({"secagg.quant-bits": 31, "server.num-train": 4}, "uint32"),
    ],
)
def test_secagg_refusals_name_the_key(flat: dict[str, Any], needle: str) -> None:
    # Execute
    found = problems({**SECAGG, **flat})
    # Assert: refused with secagg, and the same settings pass the secagg rules without it
    assert any(needle in p for p in found), found
    assert not any("secagg" in p for p in problems(flat))


def test_refusals_are_reported_per_round_range_by_the_checker() -> None:
    plan = Plan.from_flat(
        {"num-server-rounds": 4, "plan.3-4.secagg.protocol": "secagg", "plan.3-4.strategy.name": "median"}
    )
    with pytest.raises(IncompatibleComponentsError, match=r"rounds 3-4: `secagg.protocol` = secagg .* median"):
        compat.check(plan)


@pytest.mark.parametrize(
    "flat",
    [
        {},
        {"strategy.name": "fedadam", "strategy.server-lr": 0.01},
        {"lora.freeze-a": True},
        {"simulation.site-ranks": "4,2"},
        {**CENTRAL, "privacy.clip-norm": 0.5},
        {"privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0},
        {"privacy.mechanism": "local", "privacy.noise-multiplier": 1.0},
        {"secagg.degree": 4, "secagg.threshold": 3, "server.min-clients": 6},
    ],
)
def test_linear_rules_and_client_side_privacy_compose_with_secagg(flat: dict[str, Any]) -> None:
    assert problems({**SECAGG, **flat}) == []


@pytest.mark.parametrize("n", [*range(2, 40), 64, 100, 257, 1000, 5000])
def test_auto_parameters_are_valid_and_the_graph_regular_for_every_n(n: int) -> None:
    # Prepare
    cfg = RunConfig.from_flat(SECAGG)
    # Execute
    params = settings.resolve(cfg, n)
    # Assert: check_params accepts them, complete graph while small, O(log n) degree beyond
    assert check_params(n, params.degree, params.threshold, params.quant_bits, params.clip) == params.modulus_bits
    assert params.modulus_bits <= 32
    assert (params.effective_degree + 1) / 2 < params.threshold <= params.effective_degree + 1
    if n <= settings.COMPLETE_UP_TO:
        assert params.effective_degree == n - 1
    else:
        assert params.effective_degree in (n - 1, 2 * math.ceil(2 * math.log2(n)))  # complete, or even k
        assert params.effective_degree <= 4 * math.log2(n) + 2
    if n <= 300:
        graph = neighbours(list(range(n)), params.degree)
        assert {len(v) for v in graph.values()} == {params.effective_degree}


def test_auto_clip_follows_the_round_and_covers_local_noise() -> None:
    # Prepare
    plain = RunConfig.from_flat({**SECAGG, "train.local-steps": 5, "train.lr": 0.01})
    local = plain.override({"privacy.mechanism": "local", "privacy.noise-multiplier": 0.5, "privacy.clip-norm": 0.2})
    fixed = plain.override({"secagg.clip": 0.3})
    # Assert: an AdamW coordinate moves by at most 3.162 lr per step (Kingma & Ba, torch's betas)
    assert settings.resolve(plain, 3).clip == pytest.approx(0.1 / math.sqrt(0.001) * 5 * 0.01)
    assert settings.resolve(local, 3).clip == pytest.approx(0.1 / math.sqrt(0.001) * 5 * 0.01 + 4 * 0.5 * 0.2)
    assert settings.resolve(fixed, 3).clip == 0.3


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"secagg.degree": 3}, "`secagg.degree` must be 0 (auto) or an even number"),
        ({"secagg.threshold": -1}, "`secagg.threshold` must be >= 0"),
        ({"secagg.quant-bits": 0}, "`secagg.quant-bits` must be in 1..31"),
        ({"secagg.clip": float("nan")}, "`secagg.clip` must be a finite number"),
        ({"secagg.stage-timeout": 0}, "`secagg.stage-timeout` must be > 0"),
        ({"secagg.protocol": "secagg+"}, "`secagg.protocol` must be one of none, secagg"),
    ],
)
def test_bad_secagg_values_are_refused_naming_the_key(flat: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        RunConfig.from_flat(flat)
