"""Distributed DP's plain functions: the survivors' Skellam shares add up to the target noise, the integer
encoding keeps its stated sensitivities, and the plan checker refuses what would make epsilon untrue."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.errors import IncompatibleComponentsError, PrivacyBudgetExceeded
from fedtune.privacy import compat, distributed
from fedtune.privacy.accounting import epsilon
from fedtune.privacy.rounds import PrivacyState, check_budget, solved_noise
from fedtune.privacy.secagg.masking import add
from fedtune.privacy.skellam import SkellamEvent

DIST = {
    "privacy.mechanism": "distributed",
    "secagg.protocol": "secagg",
    "strategy.weighting": "uniform",
    "privacy.noise-multiplier": 1.0,
    "privacy.clip-norm": 0.1,
}


def run_config(**flat: Any) -> RunConfig:
    return RunConfig.from_flat({**DIST, "secagg.quant-bits": 12, **flat})


def distributed_rng(i: int) -> np.random.Generator:
    return np.random.default_rng(1000 + i)  # reproducible here; the client uses OS entropy


@pytest.mark.parametrize("survivors", [5, 3], ids=["all", "n-t-dropped"])
def test_the_unmasked_sum_minus_the_rounded_inputs_is_the_survivors_skellam_noise(survivors: int) -> None:
    # Prepare: 5 clients, threshold 3 (2 dropouts tolerated), 200k entries; some deltas need clipping
    d, n, threshold = 200_000, 5, 3
    cfg = run_config()
    cal = distributed.calibrate(cfg, d, threshold)
    bits = cal.modulus_need(n)
    rng = np.random.default_rng(0)
    inputs, wire = [], []
    for i in range(n):
        delta = rng.normal(0, 1, d) * (0.1 * (0.5 + i / 2) / math.sqrt(d))  # L2 norm 0.05 .. 0.25
        v = distributed.encode(delta, cfg.privacy.clip_norm, cal, rng)
        inputs.append(v)
        wire.append(distributed.to_ring(v + distributed.noise_share(d, cal.mu_share, distributed_rng(i)), bits))

    # Execute: the server adds the survivors' vectors modulo 2^b and reads the signed sum
    total = distributed.from_ring(add(wire[:survivors], bits), bits)

    # Assert: what is left after the plain integer sum is Sk(U mu_i): mean 0, variance U * 2 mu_i (2% is
    # 6 standard errors of a variance estimated from 200k entries)
    noise = (total - np.sum(inputs[:survivors], axis=0)).astype(np.float64)
    expected = survivors * 2 * cal.mu_share
    assert abs(noise.mean()) < 5 * math.sqrt(expected / d)
    assert noise.var() == pytest.approx(expected, rel=0.02)
    assert noise.var() >= 0.98 * 2 * cal.mu_target  # never less than the target, even with n - t dropped
    assert cal.min_survivors == threshold and cal.mu_target == pytest.approx((1.0 * cal.l2) ** 2 / 2)
    assert np.all(noise == np.round(noise))  # integers: nothing was lost to rounding or to a wrap


def test_encoding_clips_rounds_without_bias_and_stays_within_its_sensitivities() -> None:
    # Prepare: a vector far over the clip, and one exactly at it
    d = 5000
    cfg = run_config(**{"secagg.quant-bits": 8})
    cal = distributed.calibrate(cfg, d, 2)
    rng = np.random.default_rng(1)
    at_clip = rng.normal(0, 1, d)
    at_clip *= cfg.privacy.clip_norm / np.linalg.norm(at_clip)
    # Execute
    encoded = [distributed.encode(at_clip, cfg.privacy.clip_norm, cal, rng) for _ in range(200)]
    far = distributed.encode(at_clip * 50, cfg.privacy.clip_norm, cal, rng)
    # Assert: L2 <= l2 and L1 <= l1 = min(l2^2, sqrt(d) l2) every time; unbiased to within sampling error
    for v in [*encoded, far]:
        assert np.linalg.norm(v) <= cal.l2 and np.abs(v).sum() <= cal.l1
    assert cal.l1 == min(cal.l2**2, math.sqrt(d) * cal.l2)
    mean = np.mean(encoded, axis=0) / cal.scale
    assert np.abs(mean - at_clip).max() < 5 * 0.5 / math.sqrt(200) / cal.scale
    assert np.linalg.norm(far) / cal.scale == pytest.approx(cfg.privacy.clip_norm, rel=0.05)


def test_signed_values_survive_the_ring() -> None:
    values = np.array([-(2**19), -1, 0, 1, 2**19 - 1], dtype=np.int64)
    assert np.array_equal(distributed.from_ring(distributed.to_ring(values, 20), 20), values)


def test_the_solved_noise_keeps_the_planned_rounds_within_the_target() -> None:
    # Prepare
    arrays = {"m.lora_A.weight": np.zeros((4, 64)), "m.lora_B.weight": np.zeros((64, 4))}
    plan = Plan.from_flat({**DIST, "num-server-rounds": 3, "privacy.noise-multiplier": -1, "privacy.target-epsilon": 4})
    # Execute
    z = solved_noise(plan, arrays)
    # Assert: within 1% below the target, at the target noise of each round
    assert z is not None
    event = distributed.target_event(plan.base, z, 512)
    assert 0.99 * 4 <= epsilon([event] * 3, 1e-5) <= 4


def problems(flat: dict[str, Any]) -> list[str]:
    return compat.problems(Plan.from_flat({"num-server-rounds": 2, **DIST, **flat}))


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"secagg.protocol": "none"}, "`privacy.mechanism` = distributed needs `secagg.protocol` = secagg"),
        ({"strategy.weighting": "examples"}, "`privacy.mechanism` = distributed needs `strategy.weighting` = uniform"),
        ({"privacy.adaptive-clip": True}, "`privacy.adaptive-clip` applies to `privacy.mechanism` = central only"),
        ({"privacy.clip-on": "server"}, "`privacy.clip-on` = server applies to `privacy.mechanism` = central only"),
        ({"privacy.accountant": "prv"}, "accounted with the Skellam RDP bound; set `privacy.accountant`"),
        ({"secagg.clip": 0.5}, "`secagg.clip` does not apply to `privacy.mechanism` = distributed"),
        ({"strategy.name": "median", "server.min-clients": 3}, "`strategy.name` = median under `privacy.mechanism`"),
        ({"simulation.site-ranks": "4,2"}, "`simulation.site-ranks` under `privacy.mechanism` = distributed"),
    ],
)
def test_the_plan_checker_refuses_what_distributed_dp_cannot_account(flat: dict[str, Any], needle: str) -> None:
    # Prepare: the base settings pass
    assert problems({}) == []
    # Execute / Assert
    with pytest.raises(IncompatibleComponentsError, match=f"rounds 1-2: .*{re.escape(needle)}"):
        compat.check(Plan.from_flat({"num-server-rounds": 2, **DIST, **flat}))


def test_a_noise_too_wide_for_32_bits_is_refused_before_round_1() -> None:
    # Prepare: 30-bit integers and z = 1 leave no room in a 32-bit modulus
    arrays = {"m.lora_A.weight": np.zeros((4, 64)), "m.lora_B.weight": np.zeros((64, 4))}
    plan = Plan.from_flat({**DIST, "num-server-rounds": 2, "secagg.quant-bits": 30, "server.min-clients": 3})
    # Execute / Assert
    with pytest.raises(IncompatibleComponentsError, match=r"rounds 1-2: .*lower `secagg.quant-bits`"):
        compat.check(plan, compat.Facts(arrays=arrays, solved=None))
    compat.check(Plan.from_flat({**DIST, "num-server-rounds": 2}), compat.Facts(arrays=arrays, solved=None))  # fits


def test_the_budget_check_spends_the_floor_and_both_ledgers_survive_a_checkpoint() -> None:
    # Prepare: two rounds released 1.5x the target noise (ledger), charged at the target (floor)
    arrays = {"m.lora_A.weight": np.zeros((4, 64)), "m.lora_B.weight": np.zeros((64, 4))}
    cfg = RunConfig.from_flat({**DIST, "privacy.target-epsilon": 1.0})
    target = distributed.target_event(cfg, 1.0, 512)
    state = PrivacyState.new()
    for _ in range(2):
        state.floor.add(target)
        state.ledger.add(SkellamEvent(target.l1, target.l2, 1.5 * target.mu, 1))
    released, floor = state.ledger.epsilon(1e-5, "rdp"), state.floor.epsilon(1e-5, "rdp")
    # Execute / Assert: the floor is what a third round is checked against
    assert released < floor
    with pytest.raises(PrivacyBudgetExceeded, match=f"from {floor:.3f}"):
        check_budget(cfg, state, 3, arrays)
    restored = PrivacyState.from_dict(state.to_dict())
    assert restored.floor.epsilon(1e-5, "rdp") == floor and restored.ledger.epsilon(1e-5, "rdp") == released
