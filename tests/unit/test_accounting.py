"""Privacy accounting equals Opacus's own analysis for the same events; composition holds."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtune.core.errors import ConfigError
from fedtune.privacy.accounting import GaussianEvent, epsilon, noise_multiplier

ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders

CASES = [(1.0, 0.01, 1000, 1e-5), (0.8, 0.02, 500, 1e-5), (1.5, 0.1, 200, 1e-6), (4.0, 1.0, 10, 1e-5)]


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), CASES)
def test_rdp_epsilon_matches_opacus_rdp_analysis(sigma: float, q: float, steps: int, delta: float) -> None:
    # Reference: Opacus's RDP analysis functions, called directly
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ALPHAS)
    reference, _ = get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)
    ours = epsilon([GaussianEvent(sigma, q, steps)], delta, "rdp")
    assert ours == pytest.approx(float(reference), rel=1e-6)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), CASES[:3])
def test_prv_epsilon_matches_opacus_prv_accountant(sigma: float, q: float, steps: int, delta: float) -> None:
    reference = PRVAccountant()
    reference.history = [(sigma, q, steps)]
    ours = epsilon([GaussianEvent(sigma, q, steps)], delta, "prv")
    assert ours == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-6)
    assert ours <= epsilon([GaussianEvent(sigma, q, steps)], delta, "rdp")  # PRV is the tighter bound


def test_k_events_compose_like_one_event_k_times_longer() -> None:
    split = [GaussianEvent(1.1, 0.05, 100)] * 3
    assert epsilon(split, 1e-5) == pytest.approx(epsilon([GaussianEvent(1.1, 0.05, 300)], 1e-5), rel=1e-9)
    mixed = [GaussianEvent(1.1, 0.05, 100), GaussianEvent(2.0, 0.05, 100)]
    assert epsilon(mixed, 1e-5) > epsilon(mixed[1:], 1e-5)


def test_epsilon_noise_round_trip() -> None:
    sigma = noise_multiplier(3.0, 0.02, 400, 1e-5)
    assert epsilon([GaussianEvent(sigma, 0.02, 400)], 1e-5) <= 3.0
    assert epsilon([GaussianEvent(sigma * 0.95, 0.02, 400)], 1e-5) > 3.0 * 0.98  # and it is not far too noisy


def test_no_noise_means_no_guarantee() -> None:
    assert epsilon([GaussianEvent(1.0, 0.1, 10), GaussianEvent(0.0, 1.0, 1)], 1e-5) == math.inf
    assert epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"sample_rate": 0.0}, "sample rate"), ({"noise_multiplier": -1.0}, "noise multiplier")]
)
def test_bad_events_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GaussianEvent(**{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, **kwargs})  # type: ignore[arg-type]
