"""Every aggregation rule and server optimizer against a reference computed here with numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.config import StrategyConfig
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.strategies import STRATEGIES, make_aggregator, make_optimizer
from fedtune.strategies.exact import refactorize, refactorize_sum

KEYS = {"m.lora_A.weight": (4, 12), "m.lora_B.weight": (10, 4)}


def updates(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in KEYS.items()} for _ in range(n)]


def combine(name: str, ups: list[dict[str, np.ndarray]], weights: list[float], **kw: object) -> dict[str, np.ndarray]:
    agg = make_aggregator(StrategyConfig(name=name, **kw), {k: np.zeros(s, np.float32) for k, s in KEYS.items()})  # type: ignore[arg-type]
    for u, w in zip(ups, weights, strict=True):
        agg.add(u, w)
    return agg.result()


def stack(ups: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([u[key].astype(np.float64) for u in ups])  # (N, ...)


def test_weighted_mean_matches_numpy() -> None:
    ups, w = updates(5), [3.0, 1.0, 7.0, 2.0, 5.0]
    out = combine("fedavg", ups, w)
    for key in KEYS:
        np.testing.assert_allclose(out[key], np.average(stack(ups, key), axis=0, weights=w), rtol=1e-5, atol=1e-6)


def test_median_uniform_matches_numpy_median() -> None:
    ups = updates(6)
    out = combine("median", ups, [1.0] * 6)
    for key in KEYS:
        np.testing.assert_allclose(out[key], np.median(stack(ups, key), axis=0), rtol=1e-6)


def test_weighted_median_matches_brute_force() -> None:
    ups, w = updates(5, seed=1), [1.0, 4.0, 1.0, 1.0, 2.0]
    out = combine("median", ups, w)
    x = stack(ups, "m.lora_B.weight").reshape(5, -1)
    for j in range(x.shape[1]):
        # smallest value v whose weight mass at or below v reaches half the total
        ref = min(v for v in x[:, j] if sum(wi for xi, wi in zip(x[:, j], w, strict=True) if xi <= v) >= sum(w) / 2)
        assert out["m.lora_B.weight"].reshape(-1)[j] == pytest.approx(ref, rel=1e-6)


def test_trimmed_mean_matches_sorted_slice() -> None:
    ups = updates(10, seed=2)
    out = combine("trimmed-mean", ups, [1.0] * 10, trim_fraction=0.2)
    for key in KEYS:
        ref = np.sort(stack(ups, key), axis=0)[2:8].mean(axis=0)
        np.testing.assert_allclose(out[key], ref, rtol=1e-5, atol=1e-6)


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    # Prepare: 4 honest updates near 0, one far away
    ups = updates(5, seed=3)
    for key in KEYS:
        ups[4][key] = ups[4][key] * 100
    flat = np.stack([np.concatenate([u[k].ravel() for k in KEYS]) for u in ups]).astype(np.float64)
    dist = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    scores = [np.sort(np.delete(dist[i], i))[: 5 - 1 - 2].sum() for i in range(5)]

    # Execute
    out = combine("krum", ups, [1.0] * 5, krum_byzantine=1)
    multi = combine("multi-krum", ups, [1.0] * 5, krum_byzantine=1, multi_krum_select=3)

    # Assert
    best = int(np.argmin(scores))
    for key in KEYS:
        np.testing.assert_allclose(out[key], ups[best][key], rtol=1e-6)
        chosen = np.argsort(scores, kind="stable")[:3]
        np.testing.assert_allclose(multi[key], stack([ups[i] for i in chosen], key).mean(0), rtol=1e-5, atol=1e-6)


def test_krum_needs_enough_replies() -> None:
    with pytest.raises(FedtuneError, match="krum needs n > f \\+ 2"):
        combine("krum", updates(3), [1.0] * 3, krum_byzantine=1)


def test_exact_averages_products_and_refactorizes() -> None:
    # Prepare
    rng = np.random.default_rng(4)
    g = {
        "m.lora_A.weight": rng.normal(size=(4, 12)).astype(np.float32),
        "m.lora_B.weight": rng.normal(size=(10, 4)).astype(np.float32),
    }
    ups, w = updates(3, seed=5), [1.0, 2.0, 3.0]
    agg = make_aggregator(StrategyConfig(name="exact"), g)
    for u, wi in zip(ups, w, strict=True):
        agg.add(u, wi)

    # Execute
    delta = agg.result()

    # Assert: new B A is the best rank-4 approximation of the weighted mean of B_i A_i
    products = [
        (g["m.lora_B.weight"] + u["m.lora_B.weight"]).astype(np.float64) @ (g["m.lora_A.weight"] + u["m.lora_A.weight"])
        for u in ups
    ]
    mean = np.average(np.stack(products), axis=0, weights=w)
    u_, s, vt = np.linalg.svd(mean)
    best = (u_[:, :4] * s[:4]) @ vt[:4]
    new = (g["m.lora_B.weight"] + delta["m.lora_B.weight"]).astype(np.float64) @ (
        g["m.lora_A.weight"] + delta["m.lora_A.weight"]
    )
    np.testing.assert_allclose(new, best, rtol=1e-4, atol=1e-4)
    error = agg.metrics()["exact_reconstruction_error"]
    assert error == pytest.approx(np.linalg.norm(mean - best) / np.linalg.norm(mean), rel=1e-4)
    assert error > 0  # averaging rank-4 products generally leaves rank 4


def test_refactorize_is_exact_when_rank_suffices() -> None:
    rng = np.random.default_rng(6)
    product = rng.normal(size=(8, 3)) @ rng.normal(size=(3, 9))
    b, a, error = refactorize(product, rank=3)
    np.testing.assert_allclose(b @ a, product, atol=1e-10)
    assert error < 1e-12


@pytest.mark.parametrize(("out", "inner", "n", "r"), [(40, 30, 3, 4), (12, 50, 5, 4), (16, 16, 6, 3)])
def test_refactorize_sum_equals_the_svd_of_the_formed_product(out: int, inner: int, n: int, r: int) -> None:
    # Prepare: n weighted rank-r products, some with B = 0 (round 1 starts from B = 0), as float64
    rng = np.random.default_rng(out + n)
    bs = [rng.normal(size=(out, r)) * (i % 2) for i in range(n)]
    as_ = [rng.normal(size=(r, inner)) for _ in range(n)]
    weights = list(rng.uniform(0.1, 1.0, size=n))
    product = sum(w * b @ a for w, b, a in zip(weights, bs, as_, strict=True))

    # Execute
    b, a, error = refactorize_sum(bs, as_, weights, rank=r)

    # Assert: numpy's SVD of the formed product is the reference
    u_, s, vt = np.linalg.svd(product)
    best = (u_[:, :r] * s[:r]) @ vt[:r]
    np.testing.assert_allclose(b @ a, best, atol=1e-9)
    assert error == pytest.approx(np.linalg.norm(product - best) / np.linalg.norm(product), rel=1e-9)


def test_refactorize_falls_back_to_gesvd_when_divide_and_conquer_does_not_converge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: numpy's SVD (gesdd) fails as it did on the demo; the reference is computed before
    rng = np.random.default_rng(9)
    product = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 15)) + 1e-3 * rng.normal(size=(20, 15))
    u_, s, vt = np.linalg.svd(product)
    best = (u_[:, :3] * s[:3]) @ vt[:3]

    def fails(*args: object, **kwargs: object) -> None:
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(np.linalg, "svd", fails)

    # Execute
    b, a, error = refactorize(product, rank=3)

    # Assert
    np.testing.assert_allclose(b @ a, best, atol=1e-10)
    assert error == pytest.approx(np.linalg.norm(product - best) / np.linalg.norm(product), rel=1e-9)


def adam_reference(
    deltas: list[np.ndarray], x0: np.ndarray, lr: float, b1: float, b2: float, tau: float, rule: str
) -> np.ndarray:
    x, m, v = x0.astype(np.float64), np.zeros_like(x0, np.float64), np.full(x0.shape, tau**2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if rule == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif rule == "yogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = v + d * d
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(("name", "rule"), [("fedadam", "adam"), ("fedyogi", "yogi"), ("fedadagrad", "adagrad")])
def test_adaptive_optimizers_follow_reddi_et_al(name: str, rule: str) -> None:
    # Prepare
    rng = np.random.default_rng(7)
    x0 = rng.normal(size=(5, 3)).astype(np.float32)
    deltas = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(4)]
    cfg = StrategyConfig(name=name, server_lr=0.1, beta1=0.8, beta2=0.95, tau=1e-2)

    # Execute: a fresh optimizer each round, restored from the last state (as the loop does)
    x, state = {"w": x0}, {}
    for d in deltas:
        opt = make_optimizer(cfg)
        opt.load_state_dict(state)
        x = opt.step(x, {"w": d})
        state = opt.state_dict()

    # Assert
    np.testing.assert_allclose(x["w"], adam_reference(deltas, x0, 0.1, 0.8, 0.95, 1e-2, rule), rtol=1e-4, atol=1e-5)


def test_fedavgm_momentum() -> None:
    rng = np.random.default_rng(8)
    x0 = rng.normal(size=(3,)).astype(np.float32)
    deltas = [rng.normal(size=(3,)).astype(np.float32) for _ in range(3)]
    opt = make_optimizer(StrategyConfig(name="fedavgm", server_lr=0.5, momentum=0.9))
    x = {"w": x0}
    for d in deltas:
        x = opt.step(x, {"w": d})
    v = 0.0
    ref = x0.astype(np.float64)
    for d in deltas:
        v = 0.9 * v + d
        ref = ref + 0.5 * v
    np.testing.assert_allclose(x["w"], ref, rtol=1e-5)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_builds_and_combines(name: str) -> None:
    ups = updates(6, seed=9)
    out = combine(name, ups, [1.0] * 6)
    assert set(out) == set(KEYS) and all(np.isfinite(v).all() for v in out.values())
    opt = make_optimizer(StrategyConfig(name=name))
    assert set(opt.step({k: np.zeros(s, np.float32) for k, s in KEYS.items()}, out)) == set(KEYS)


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"`strategy.name` must be one of exact, fedadagrad, fedadam"):
        STRATEGIES.get("fedsomething")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_weighted_mean_in_either_sum_dtype(dtype: str) -> None:
    ups, w = updates(7, seed=11), [2.0, 1.0, 1.0, 3.0, 5.0, 1.0, 4.0]
    out = combine("fedavg", ups, w, sum_dtype=dtype)
    for key in KEYS:
        np.testing.assert_allclose(out[key], np.average(stack(ups, key), axis=0, weights=w), rtol=1e-5, atol=1e-6)


def test_float64_sum_does_not_depend_on_arrival_order() -> None:
    # Prepare: values spanning magnitudes, where float32 summation order matters
    rng = np.random.default_rng(12)
    ups = [
        {k: (rng.normal(size=s) * 10.0 ** rng.integers(-4, 3)).astype(np.float32) for k, s in KEYS.items()}
        for _ in range(30)
    ]
    w = [float(x) for x in rng.integers(1, 50, size=30)]
    order = rng.permutation(30)

    # Execute
    first = combine("fedavg", ups, w)
    second = combine("fedavg", [ups[i] for i in order], [w[i] for i in order])

    # Assert
    for key in KEYS:
        np.testing.assert_array_equal(first[key], second[key])


def test_sum_of_squares_flags_non_finite_values() -> None:
    from fedtune.strategies.kernels import sum_of_squares

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert sum_of_squares(x) == pytest.approx(float((x.astype(np.float64) ** 2).sum()))
    x[1, 1] = np.nan
    assert np.isnan(sum_of_squares(x))
    x[1, 1] = np.inf
    assert np.isinf(sum_of_squares(x))
