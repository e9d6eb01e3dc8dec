"""Distributed DP end to end on the tiny preset: SecAgg+ with Skellam noise shares, a target epsilon, and
one client crashing in round 1; the shared backend runs the real server loop and ClientApp."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from fedtune.client.pipeline import LocalUpdate
from tests.integration.test_secagg_e2e import FAST, WireGrid, adapter, crash, federate, record_deltas

TARGET = 6.0


@pytest.fixture
def deltas(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, int], LocalUpdate]:
    return record_deltas(monkeypatch)


def paper_rdp(order: float, l1: float, l2: float, mu: float) -> float:
    """Agarwal et al. 2021 (§3, multi-dimensional Skellam RDP), written out again here (integer orders;
    a fractional one is rounded up)."""
    a = math.ceil(order)
    return a * l2 * l2 / (4 * mu) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (16 * mu * mu), 3 * l1 / (4 * mu))


def test_distributed_dp_charges_the_noise_the_survivors_added_and_stays_within_the_target(
    tiny_model: Path, tmp_path: Path, deltas: dict[tuple[int, int], LocalUpdate]
) -> None:
    # Prepare: 3 clients (threshold 2); node 2 crashes while training in round 1
    flat = {
        **FAST,
        "privacy.mechanism": "distributed",
        "privacy.target-epsilon": TARGET,
        "privacy.clip-norm": 0.05,
        "strategy.weighting": "uniform",
    }

    # Execute
    rows, _ = federate(tiny_model, tmp_path / "run", flat, lambda n: WireGrid(crash("train.secagg", 1, [2]), n))

    # Assert: round 1 released 2 shares (exactly the target), round 2 three (1.5 times the target's variance)
    first, second = rows[1]["secagg"]["distributed"], rows[2]["secagg"]["distributed"]
    assert rows[1]["replied_nodes"] == [1, 3] and rows[2]["replied_nodes"] == [1, 2, 3]
    assert first["mu_released"] == pytest.approx(first["mu_target"], rel=1e-12)
    assert second["mu_released"] == pytest.approx(1.5 * second["mu_target"], rel=1e-12)
    # each row's epsilon is Opacus's conversion of the summed bound over the noise recorded so far
    orders = RDPAccountant.DEFAULT_ALPHAS
    total = np.zeros(len(orders))
    for rnd in (1, 2):
        info = rows[rnd]["secagg"]["distributed"]
        total += [paper_rdp(a, info["l1"], info["l2"], info["mu_released"]) for a in orders]
        reference, _ = get_privacy_spent(orders=orders, rdp=total, delta=1e-5)
        assert rows[rnd]["epsilon"] == pytest.approx(reference, rel=1e-9)
        assert rows[rnd]["epsilon"] <= TARGET
    # the noise is in the applied mean: round 2 moved the adapter by (sum of clipped deltas + noise) / 3
    before, after = adapter(tmp_path / "run", 1), adapter(tmp_path / "run", 2)
    order = sorted(before)
    clipped = []
    for n in (1, 2, 3):
        d = np.concatenate([deltas[2, n].delta[k].astype(np.float64).ravel() for k in order])  # type: ignore[index]
        clipped.append(d * min(1.0, 0.05 / np.linalg.norm(d)))
    moved = np.concatenate([(after[k].astype(np.float64) - before[k]).ravel() for k in order])
    noise = moved - np.sum(clipped, axis=0) / 3
    assert abs(noise.std() / second["noise_std_of_mean"] - 1) < 0.05
    # summary.json states the trust assumption and the epsilon that survives collusion (target noise only)
    section = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert section["mechanism"] == "distributed" and "honest-but-curious" in section["trust"]
    assert "n - m" in section["collusion"] and "trusted to clip and to add their share" in section["trust"]
    assert section["epsilon"] <= section["epsilon_under_collusion"] <= TARGET
    assert section["client_sampling"] == "fixed-size: no amplification claimed (q = 1)"
