"""Secure aggregation in the plan: what the checker refuses under it, and parameters that hold for any N."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.errors import ConfigError, IncompatibleComponentsError
from fedtune.privacy import compat
from fedtune.privacy.secagg import settings
from fedtune.privacy.secagg.errors import SecAggError
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
        {"simulation.site-ranks": "4,4,2", "simulation.num-supernodes": 3, "server.min-clients": 3},
        {**CENTRAL, "privacy.clip-norm": 0.5},
        {"privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0},
        {"privacy.mechanism": "local", "privacy.noise-multiplier": 1.0},
        {"secagg.degree": 4, "secagg.threshold": 3, "server.min-clients": 6},
    ],
)
def test_linear_rules_and_client_side_privacy_compose_with_secagg(flat: dict[str, Any]) -> None:
    assert problems({**SECAGG, **flat}) == []


def sites(ranks: str, n: int, sample: int, **more: Any) -> dict[str, Any]:
    """``n`` simulated sites cycling ``ranks`` under a global rank of 8, at least ``sample`` of them sampled."""
    return {
        **SECAGG,
        "lora.r": 8,
        "simulation.site-ranks": ranks,
        "simulation.num-supernodes": n,
        "server.min-clients": sample,
        **more,
    }


@pytest.mark.parametrize(
    ("flat", "band", "few", "t"),
    [
        (sites("4,2,2", 3, 3), "3..4", 1, 2),  # the finding: components 3..4 are site A's alone
        (sites("4,4,2", 3, 2), "3..4", 1, 2),  # a sample of 2 can be one rank-4 and the rank-2 site
        (sites("8,4", 4, 4), "5..8", 2, 3),  # 4 sampled of 4: t = 3, two rank-8 sites
        (sites("4,4,4,2,2", 5, 5, **{"secagg.threshold": 4}), "3..4", 3, 4),  # the auto t = 3 would do
        (sites("8,4,4,4", 8, 6), "5..8", 1, 4),  # 6 of 8 sites: as few as 1 of the two rank-8 ones
    ],
)
def test_mixed_ranks_with_a_band_under_t_sites_of_a_sample_are_refused_under_secagg(
    flat: dict[str, Any], band: str, few: int, t: int
) -> None:
    # Execute
    found = problems(flat)
    # Assert: one line per round range, naming the keys, the band and the threshold; without secagg, no problem
    pattern = (
        rf"rounds 1-2: `simulation.site-ranks` = {flat['simulation.site-ranks']} over .* components "
        rf"{band.replace('.', '[.]')} trained by only {few} site\(s\), fewer than `secagg.threshold` = {t}, and"
    )
    assert len([p for p in found if "`simulation.site-ranks`" in p]) == 1, found
    assert any(re.match(pattern, p) for p in found), found
    assert problems({**flat, "secagg.protocol": "none"}) == []


@pytest.mark.parametrize(
    "flat",
    [
        sites("4,4,2", 3, 3),  # t = 2: components 3..4 by 2 sites, 1..2 by 3
        sites("4,4,4,2,2", 5, 5),  # t = 3: 3..4 by 3
        sites("4,4,4,4,4,2", 6, 4),  # any 4 of 6 hold at least 3 rank-4 sites; t = 3
        sites("2", 2, 2),  # one rank below lora.r: components 3..8 are trained by nobody
        sites("8,8,8,8", 4, 2),  # one rank
    ],
)
def test_mixed_ranks_with_every_band_over_t_sites_pass_under_secagg(flat: dict[str, Any]) -> None:
    assert problems(flat) == []


def test_a_thin_rank_band_is_reported_with_every_other_problem() -> None:
    # Prepare
    plan = Plan.from_flat({"num-server-rounds": 3, **sites("4,2,2", 3, 3), "plan.3.strategy.name": "median"})
    # Execute / Assert: one error, both problems, each naming its rounds
    with pytest.raises(IncompatibleComponentsError, match=r"rounds 1-3: `simulation.site-ranks` = 4,2,2 .*\| ") as err:
        compat.check(plan)
    assert "round 3: `secagg.protocol` = secagg reveals only the sum" in str(err.value)


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


def _settings_the_server_accepts() -> list[tuple[int, int, int]]:
    """(n, degree, threshold) combinations the server itself does not refuse (those never reach a site)."""
    out = []
    for n in [2, 3, 5, 8, 17, 40, 300]:
        for degree, threshold in [(0, 0), (4, 0), (6, 5)]:
            cfg = RunConfig.from_flat({**SECAGG, "secagg.degree": degree, "secagg.threshold": threshold})
            if not settings.problems(cfg, n):
                out.append((n, degree, threshold))
    return out


def test_the_site_check_covers_most_server_settings() -> None:
    # Assert: the parametrization below is not emptied by the server's own refusals
    assert len(_settings_the_server_accepts()) >= 18


@pytest.mark.parametrize(("n", "degree", "threshold"), _settings_the_server_accepts())
def test_a_client_accepts_exactly_the_degree_and_threshold_the_server_resolves(
    n: int, degree: int, threshold: int
) -> None:
    # Prepare: what the server sends (resolve, and the degree the graph it lays really has)
    cfg = RunConfig.from_flat({**SECAGG, "secagg.degree": degree, "secagg.threshold": threshold})
    params = settings.resolve(cfg, n)
    k = len(neighbours(list(range(n)), params.degree)[0])
    # Execute / Assert: accepted as sent; one neighbour or one share more or less is refused
    settings.check_assigned(degree, threshold, n, k, params.threshold)
    for wrong_k, wrong_t in [(k - 1, params.threshold), (k + 1, params.threshold), (k, params.threshold - 1)]:
        with pytest.raises(SecAggError, match=r"refusing the round|advertised keys"):
            settings.check_assigned(degree, threshold, n, wrong_k, wrong_t)
    with pytest.raises(SecAggError, match=f"threshold {params.threshold + 1}, but"):
        settings.check_assigned(degree, threshold, n, k, params.threshold + 1)


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
    ],
)
def test_bad_secagg_values_are_refused_naming_the_key(flat: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        RunConfig.from_flat(flat)


def test_an_unknown_protocol_is_refused_by_the_checker_listing_the_registered_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"rounds 1-2: `secagg\.protocol` must be one of none, secagg; got 'secagg\+'"
    ):
        compat.check(Plan.from_flat({"num-server-rounds": 2, "secagg.protocol": "secagg+"}))
