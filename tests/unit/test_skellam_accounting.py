"""The Skellam RDP bound against the exact Renyi divergence and Opacus's Gaussian RDP, and Skellam events
in the ledger against Opacus's own RDP -> (epsilon, delta) conversion on the summed curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.special import logsumexp
from scipy.stats import poisson, skellam

from fedtune.core.errors import ConfigError
from fedtune.privacy.accounting import GaussianEvent, epsilon
from fedtune.privacy.ledger import Ledger
from fedtune.privacy.skellam import ORDERS, SkellamEvent, skellam_rdp


def skellam_logpmf(mu: float, k: np.ndarray) -> np.ndarray:
    """log P(X - Y = k), X, Y ~ Poisson(mu), summed in log space (scipy's skellam pmf underflows in the tails)."""
    j = np.arange(int(mu + 40 * math.sqrt(mu) + 2 * np.abs(k).max() + 100))
    return logsumexp(poisson.logpmf(j[None, :] + k[:, None], mu) + poisson.logpmf(j, mu)[None, :], axis=1)


def exact_rdp(mu: float, shift: int, orders: list[float]) -> list[float]:
    """D_alpha(Sk(mu) + shift || Sk(mu)) on a support wide enough that the rest is negligible."""
    width = int(shift + 30 * math.sqrt(2 * mu) + 100)
    k = np.arange(-width, width + shift + 1)
    log_q = skellam_logpmf(mu, k)
    visible = log_q > -700  # where scipy's own pmf is representable, the two must agree
    np.testing.assert_allclose(np.exp(log_q[visible]), skellam.pmf(k[visible], mu, mu), rtol=1e-6)
    log_p = np.concatenate([np.full(shift, -np.inf), log_q[:-shift]])  # P(k) = Q(k - shift)
    return [float(logsumexp(a * log_p + (1 - a) * log_q) / (a - 1)) for a in orders]


@pytest.mark.parametrize("mu", [0.5, 3.0, 50.0])
def test_the_bound_is_at_least_the_exact_divergence_of_a_shifted_skellam(mu: float) -> None:
    # Prepare: 1-D, so the L1 and L2 sensitivities are both the shift
    orders = [1.5, 2.0, 3.0, 5.0, 12.0, 20.0]
    for shift in (1, 3):
        # Execute
        exact = exact_rdp(mu, shift, orders)
        bound = [skellam_rdp(a, shift, shift, mu) for a in orders]
        # Assert
        for a, e, b in zip(orders, exact, bound, strict=True):
            assert 0 < e <= b, (mu, shift, a, e, b)


def test_the_bound_tends_to_opacus_gaussian_rdp_at_the_same_variance() -> None:
    # Prepare: sigma^2 = 2 mu, sensitivity l2 (l1 = sqrt(d) l2 for d = 10^4 entries)
    l2 = 1000.0
    l1 = 100 * l2
    orders = list(ORDERS)
    gaps = []
    for mu in (1e5, 1e7, 1e9):
        gaussian = compute_rdp(q=1.0, noise_multiplier=math.sqrt(2 * mu) / l2, steps=1, orders=orders)
        # Execute: integer orders (the bound rounds a fractional order up)
        bound = np.array([skellam_rdp(a, l1, l2, mu) for a in orders])
        ints = np.array([a == int(a) for a in orders])
        # Assert: never below the Gaussian, and ever closer to it
        assert np.all(bound >= gaussian * (1 - 1e-12))
        gaps.append(float(np.max(bound[ints] / gaussian[ints] - 1)))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3, gaps


def test_ledger_epsilon_equals_opacus_on_the_summed_rdp_curve() -> None:
    # Prepare: rounds with different survivors (mu), two identical in a row, and one DP-FedAvg round
    rounds = [SkellamEvent(50.0, 10.0, mu, 1) for mu in (300.0, 300.0, 450.0)]
    gaussian = GaussianEvent(2.0, 1.0, 1)
    ledger = Ledger()
    for e in [*rounds, gaussian]:
        ledger.add(e)
    orders = list(ORDERS)
    direct = sum(np.array([skellam_rdp(a, e.l1, e.l2, e.mu) for a in orders]) for e in rounds)
    direct = direct + compute_rdp(q=1.0, noise_multiplier=2.0, steps=1, orders=orders)
    # Execute
    eps = ledger.epsilon(1e-5, "rdp")
    # Assert: merged (3 entries), same epsilon as Opacus's conversion, and a checkpoint round trip keeps it
    reference, _ = get_privacy_spent(orders=orders, rdp=direct, delta=1e-5)
    assert len(ledger.events) == 3 and ledger.events[0] == SkellamEvent(50.0, 10.0, 300.0, 2)
    assert eps == pytest.approx(reference, rel=1e-12)
    assert Ledger.from_dict(ledger.to_dict()).epsilon(1e-5, "rdp") == pytest.approx(eps, rel=1e-12)


def test_k_identical_rounds_cost_one_event_of_k_steps_and_more_noise_costs_less() -> None:
    # Prepare
    one = SkellamEvent(40.0, 8.0, 200.0, 1)
    # Execute
    apart = epsilon([one] * 5, 1e-5)
    together = epsilon([SkellamEvent(40.0, 8.0, 200.0, 5)], 1e-5)
    # Assert
    assert apart == pytest.approx(together, rel=1e-12)
    assert epsilon([SkellamEvent(40.0, 8.0, 400.0, 5)], 1e-5) < together
    assert epsilon([SkellamEvent(40.0, 8.0, 0.0, 1)], 1e-5) == math.inf


def test_skellam_events_refuse_the_prv_accountant_and_bad_sensitivities() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.accountant"):
        epsilon([SkellamEvent(4.0, 2.0, 10.0, 1)], 1e-5, "prv")
    with pytest.raises(ConfigError, match="l1 >= l2"):
        SkellamEvent(1.0, 2.0, 10.0, 1)
