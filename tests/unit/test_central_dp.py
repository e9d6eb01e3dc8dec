"""DP-FedAvg's pieces against plain numpy: clipping, the noised mean, the noise scale, adaptive clipping;
and the epsilon of the noise a run really adds, measured and recomputed with Opacus."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtune.config.plan import Plan
from fedtune.privacy import rounds
from fedtune.privacy.central import NoisedSum, clip, l2_norm, next_clip_norm, privatize_locally, split_noise
from fedtune.privacy.mechanisms.central import adapt_clip, central_round
from fedtune.server import loop
from fedtune.server.state import ServerState
from fedtune.wire import keys
from fedtune.wire.records import float32_records
from tests.unit.test_loop import FakeGrid


def deltas(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)} for _ in range(n)
    ]


def flat(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.ravel() for v in d.values()]).astype(np.float64)


def test_clip_bounds_the_norm_and_keeps_the_direction() -> None:
    for d in deltas(5):
        clipped, norm = clip(d, 1.0)
        assert norm == pytest.approx(np.linalg.norm(flat(d)), rel=1e-6)
        assert l2_norm(clipped) <= 1.0 + 1e-6
        np.testing.assert_allclose(flat(clipped), flat(d) * min(1.0, 1.0 / norm), rtol=1e-6)
    small = {"a": np.full(3, 0.01, np.float32)}
    assert clip(small, 1.0)[0] is small


def test_noiseless_sum_equals_the_plain_sum_of_clipped_deltas_over_the_fixed_denominator() -> None:
    ds = deltas(6)
    agg = NoisedSum(1.5, 0.0, denominator=8.0, rng=np.random.default_rng(0), clip_on_server=True)
    for d in ds:
        agg.add(d, l2_norm(d))
    out = agg.result({k: np.zeros_like(v) for k, v in ds[0].items()})
    reference = sum(flat(d) * min(1.0, 1.5 / np.linalg.norm(flat(d))) for d in ds) / 8.0
    np.testing.assert_allclose(flat(out), reference, rtol=1e-5, atol=1e-7)
    assert agg.count == 6 and agg.unclipped == sum(np.linalg.norm(flat(d)) <= 1.5 for d in ds)


def test_noise_has_std_z_times_c_over_the_denominator() -> None:
    ref = {"w": np.zeros(200_000, np.float32)}
    agg = NoisedSum(0.5, 2.0, denominator=4.0, rng=np.random.default_rng(1), clip_on_server=True)
    out = agg.result(ref)["w"]
    assert out.std() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.01)
    assert abs(out.mean()) < 5 * 0.25 / math.sqrt(out.size)


def test_client_clipping_mode_rejects_an_update_above_c() -> None:
    agg = NoisedSum(1.0, 1.0, denominator=2.0, rng=np.random.default_rng(0), clip_on_server=False)
    agg.add({"a": np.full(4, 0.5, np.float32)}, 1.0, fits=True)  # norm exactly C passes
    with pytest.raises(ValueError, match=r"exceeds `privacy\.clip-norm`"):
        agg.add({"a": np.full(4, 1.0, np.float32)}, 2.0)


def test_client_clipping_mode_clips_a_reply_within_rounding_of_c_to_c() -> None:
    # Prepare: a reply of norm C (1 + 1e-6), within the tolerance that lets float rounding through
    c, denominator = 0.7, 3.0
    d = {"a": np.full(6, 1.0, np.float32), "b": np.full(3, -2.0, np.float32)}
    d = {k: (v * np.float32(c * (1 + 1e-6) / np.linalg.norm(flat(d)))).astype(np.float32) for k, v in d.items()}
    assert np.linalg.norm(flat(d)) > c * (1 + 5e-7)
    agg = NoisedSum(c, 0.0, denominator=denominator, rng=np.random.default_rng(0), clip_on_server=False)

    # Execute
    agg.add(d, l2_norm(d), fits=True)
    out = agg.result({k: np.zeros_like(v) for k, v in d.items()})

    # Assert: it moves the sum by at most C (plain numpy norm of the released sum), in its own direction
    contribution = flat(out) * denominator
    assert np.linalg.norm(contribution) <= c
    np.testing.assert_allclose(contribution, flat(d) / (1 + 1e-6), rtol=1e-5)


def test_adaptive_split_spends_the_same_as_one_release() -> None:
    z, sigma_b = 1.2, 3.0
    z_delta = split_noise(z, sigma_b)
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
    assert z_delta > z
    with pytest.raises(ValueError, match="clip-count-stddev"):
        split_noise(2.0, 1.0)
    assert split_noise(0.0, 0.5) == 0.0  # no noise at all (the ledger says inf): nothing to split


def test_clip_norm_moves_geometrically_towards_the_quantile() -> None:
    rng = np.random.default_rng(0)
    kw: dict[str, Any] = {"denominator": 10, "count_stddev": 0.0, "quantile": 0.5, "lr": 0.2, "rng": rng}
    up, share = next_clip_norm(1.0, unclipped=0, count=10, **kw)
    assert share == 0 and up == pytest.approx(math.exp(0.1))
    down, share = next_clip_norm(1.0, unclipped=10, count=10, **kw)
    assert share == 1 and down == pytest.approx(math.exp(-0.1))
    _, share = next_clip_norm(1.0, unclipped=3, count=8, **kw)  # fewer than expected: (3 - 4) / 10 + 1/2
    assert share == pytest.approx(0.4)


def test_local_privatization_clips_then_adds_noise_of_std_z_c() -> None:
    d = {"w": np.full(100_000, 1.0, np.float32)}
    out = privatize_locally(d, 2.0, 0.5, np.random.default_rng(0))["w"]
    clipped = clip(d, 2.0)[0]["w"]
    assert (out - clipped).std() == pytest.approx(0.5 * 2.0, rel=0.02)
    np.testing.assert_allclose(privatize_locally(d, 2.0, 0.0, np.random.default_rng(0))["w"], clipped)


def test_epsilon_of_the_noise_a_run_really_adds_does_not_exceed_the_printed_one(task_identity: None) -> None:
    """The issue-13 check: measure both noises the adaptive-clipping run adds and how far one site moves
    each release, then recompute epsilon with Opacus for that mechanism; it must not exceed the printed one."""
    # Prepare: 10 sites, Poisson q = 0.5, z = 1, adaptive clipping; every delta is 0 (so the change of the
    # global adapter is the delta noise); odd nodes report that their update fit under C
    z, q, num_rounds, sites = 1.0, 0.5, 3, 10
    denominator = q * sites
    plan = Plan.from_flat(
        {
            "num-server-rounds": num_rounds,
            "privacy.mechanism": "central",
            "privacy.noise-multiplier": z,
            "privacy.adaptive-clip": True,
            "strategy.weighting": "uniform",
            "server.sampling": "poisson",
            "server.fraction-train": q,
            "server.min-clients": 1,
            "eval.federated": False,
        }
    )
    adapter = {
        "m.lora_A.weight": np.zeros((2, 20_000), np.float32),
        "m.lora_B.weight": np.zeros((20_000, 2), np.float32),
    }

    def site(msg: Message) -> Message:
        metrics = MetricRecord(
            {keys.TRAIN_LOSS: 1.0, keys.NUM_EXAMPLES: 1, keys.UNDER_CLIP: msg.metadata.dst_node_id % 2}
        )
        zero = float32_records({k: np.zeros_like(v) for k, v in adapter.items()}, keys.DELTA)
        return Message(RecordDict({**zero, keys.METRICS: metrics}), reply_to=msg)

    state = ServerState(round=0, global_arrays=dict(adapter), rng=np.random.default_rng(0))
    state.noise_rng = np.random.default_rng(1)  # fixed here so the test is repeatable
    seen: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []

    # Execute (a): the real loop; each round's change of the global adapter is its delta noise over the denominator
    loop.run(
        plan,
        FakeGrid(list(range(1, sites + 1)), site),
        state,
        evaluate=lambda a, c: {},
        on_round=lambda s, row: seen.append((row.to_json(), dict(s.global_arrays))),
    )
    delta_noise = [  # the noise on each round's sum, in units of that round's C
        (flat(now) - flat(before)) * denominator / row["clip_norm"]
        for (_, before), (row, now) in itertools.pairwise(seen)
        if row["updated"]
    ]
    sum_noise_std = float(np.sqrt(np.mean([np.mean(n**2) for n in delta_noise])))

    # Execute (b): the same server path, repeated; C's update reveals the count: b = quantile - ln(C'/C) / lr
    cfg = rounds.round_config(plan.for_round(1), rounds.PrivacyState.new(), None)
    p = cfg.privacy
    small = {"w": np.zeros(4, np.float32)}

    def released(
        bits: list[int], rng: np.random.Generator, extra: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, float]:
        central = central_round(cfg, denominator, rng)
        for bit in bits:
            central.noised.add({"w": np.zeros(4, np.float32)}, 0.0, fits=bool(bit))
        if extra is not None:
            central.noised.add(extra, l2_norm(extra), fits=True)
        out = central.noised.result(small)["w"].astype(np.float64)
        fields = adapt_clip(cfg, rounds.PrivacyState.new(), central, rng)
        share = p.target_quantile - math.log(fields["clip_norm_next"] / p.clip_norm) / p.clip_lr
        return out * denominator, share * denominator  # the released sum and count, before dividing

    rng = np.random.default_rng(2)
    counts = [released([1, 0, 1, 0, 1], rng)[1] for _ in range(4000)]
    count_noise_std = float(np.std(counts))
    # How far one site moves each release: the same noise (same seed) with and without that site
    base_sum, base_count = released([1, 0, 1, 0, 1], np.random.default_rng(3))
    count_sensitivity = max(
        abs(released([1, 0, 1, 0, 1, bit], np.random.default_rng(3))[1] - base_count) for bit in (0, 1)
    )
    edge = {"w": np.full(4, p.clip_norm * (1 + 1e-6) / 2, np.float32)}  # norm C (1 + 1e-6): accepted
    sum_sensitivity = float(np.linalg.norm(released([1, 0, 1, 0, 1], np.random.default_rng(3), edge)[0] - base_sum))

    # Assert: epsilon of one subsampled Gaussian whose noise multiplier combines the two measured ones
    z_delta = sum_noise_std / (sum_sensitivity / p.clip_norm)
    z_count = count_noise_std / count_sensitivity
    z_eff = (z_delta**-2 + z_count**-2) ** -0.5
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=z_eff, steps=num_rounds, orders=orders)
    measured, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=p.delta)
    printed = seen[-1][0]["epsilon"]
    assert delta_noise and sum_sensitivity == pytest.approx(p.clip_norm, rel=1e-5)
    assert measured <= printed * 1.02, (measured, printed, z_delta, z_count, z_eff)
