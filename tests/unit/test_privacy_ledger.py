"""The ledger composes events exactly as Opacus's accountants do, and never forgets an un-noised round."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedtune.privacy.accounting import GaussianEvent, epsilon
from fedtune.privacy.ledger import Ledger, solve_noise

ROUNDS = [(1.1, 0.05, 30), (1.1, 0.05, 30), (0.9, 0.1, 20), (1.1, 0.05, 10), (2.0, 1.0, 1)]


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float, kind: str) -> float:
    reference = RDPAccountant() if kind == "rdp" else PRVAccountant()
    reference.history = list(history)  # one entry per release, unmerged
    return float(reference.get_epsilon(delta=delta))


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_merged_ledger_equals_opacus_on_the_raw_history(kind: str) -> None:
    ledger = Ledger()
    for z, q, n in ROUNDS:
        ledger.add(GaussianEvent(z, q, n))
    assert len(ledger.events) == 4  # the two identical consecutive releases merged
    assert ledger.epsilon(1e-5, kind) == pytest.approx(opacus_epsilon(ROUNDS, 1e-5, kind), rel=1e-6)  # type: ignore[arg-type]


def test_look_ahead_equals_adding_the_event() -> None:
    ledger = Ledger([GaussianEvent(1.0, 0.1, 50)])
    nxt = GaussianEvent(1.0, 0.1, 10)
    ahead = ledger.epsilon(1e-5, "rdp", extra=nxt)
    ledger.add(nxt)
    assert ahead == pytest.approx(ledger.epsilon(1e-5, "rdp"), rel=1e-12)
    assert ahead > Ledger([GaussianEvent(1.0, 0.1, 50)]).epsilon(1e-5, "rdp")  # composition only grows


def test_an_unnoised_round_makes_epsilon_infinite_and_survives_a_round_trip() -> None:
    ledger = Ledger([GaussianEvent(1.0, 0.1, 50)])
    ledger.add_unprotected(3)
    restored = Ledger.from_dict(ledger.to_dict())
    assert math.isinf(restored.epsilon(1e-5, "rdp"))
    assert restored.events == ledger.events and restored.unprotected == [3]


def test_solve_noise_agrees_with_opacus_search_for_uniform_events() -> None:
    q, steps, target, delta = 0.02, 400, 4.0, 1e-5
    ours = solve_noise(lambda z: [GaussianEvent(z, q, steps)], target, delta, "rdp")
    theirs = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps)
    assert epsilon([GaussianEvent(ours, q, steps)], delta) <= target
    assert ours == pytest.approx(theirs, rel=0.02)


def test_solve_noise_handles_rounds_with_different_sample_rates() -> None:
    def events(z: float) -> list[GaussianEvent]:
        return [GaussianEvent(z, 0.3, 5), GaussianEvent(z, 1.0, 5)]

    z = solve_noise(events, 6.0, 1e-5, "rdp")
    assert 6.0 * 0.99 <= epsilon(events(z), 1e-5) <= 6.0
