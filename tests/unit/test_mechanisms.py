"""Privacy mechanisms are registered parts: every name builds, round-trips its config and passes or
fails the plan checker as expected; a test-only mechanism plugs in with no change outside this module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.arrays import Arrays
from fedtune.core.errors import ConfigError
from fedtune.privacy import compat
from fedtune.privacy.central import clip, l2_norm
from fedtune.privacy.mechanisms import MECHANISMS, Mechanism
from fedtune.privacy.mechanisms.central import CentralDP
from fedtune.strategies import Aggregator, make_aggregator
from fedtune.wire import keys
from fedtune.wire.records import float32_records, read_arrays
from tests.unit.test_loop import GLOBAL, FakeGrid, run_loop

CLIP = 0.5


class ZeroNoiseSum:
    """The toy's server half: the strategy's aggregate, plus a figure saying it added no noise."""

    def __init__(self, inner: Aggregator) -> None:
        self.inner = inner

    def add(self, delta: Arrays, weight: float, *, rank: int | None = None, under_clip: bool = False) -> None:
        self.inner.add(delta, weight, rank=rank, under_clip=under_clip)

    def add_sum(self, total: Arrays, parts: Any) -> None:
        self.inner.add_sum(total, parts)

    def result(self) -> Arrays:
        return {k: v + np.float32(0.0) for k, v in self.inner.result().items()}  # N(0, 0)

    def metrics(self) -> dict[str, float]:
        return {"zero_noise_std": 0.0}


class ZeroNoise(Mechanism):
    """Test-only: each site clips its delta to `privacy.clip-norm` and the server adds zero noise (no
    guarantee, so it is not a DP mechanism)."""

    name = "zero-noise"
    dp = False

    def problems(self, cfg: RunConfig) -> list[str]:
        return [] if cfg.privacy.clip_norm > 0 else ["`privacy.clip-norm` must be > 0 under zero-noise."]

    def aggregator(self, cfg: RunConfig, global_arrays: Arrays, denominator: float, rng: Any, **kw: Any) -> Aggregator:
        return ZeroNoiseSum(make_aggregator(cfg.strategy, global_arrays))

    def client_step(self, cfg: RunConfig, delta: Arrays, metrics: dict[str, Any]) -> Arrays:
        return clip(delta, cfg.privacy.clip_norm)[0]


MECHANISMS.register("zero-noise")(ZeroNoise())

# What the plan checker says of each mechanism with noise set and every other setting at its default.
EXPECTED: dict[str, list[str]] = {
    "none": [],
    "dp-sgd": [],
    "central": ["`privacy.mechanism` = central needs `strategy.weighting` = uniform"],
    "local": [],
    "distributed": [
        "`privacy.mechanism` = distributed needs `strategy.weighting` = uniform",
        "`privacy.mechanism` = distributed needs `secagg.protocol` = secagg",
    ],
    "zero-noise": [],
}


def test_every_registered_mechanism_has_an_expectation() -> None:
    assert sorted(EXPECTED) == MECHANISMS.names()


@pytest.mark.parametrize("name", MECHANISMS.names())
def test_each_mechanism_builds_round_trips_its_config_and_meets_the_checker(name: str) -> None:
    # Prepare
    flat = {"privacy.mechanism": name, "privacy.noise-multiplier": 1.0, "num-server-rounds": 2}

    # Execute
    mechanism = MECHANISMS.get(name)
    cfg = RunConfig.from_flat(flat)
    again = RunConfig.from_flat(cfg.to_flat())
    found = compat.problems(Plan.from_flat(flat))

    # Assert
    assert isinstance(mechanism, Mechanism) and mechanism.name == name
    assert again == cfg and again.privacy.mechanism == name
    assert len(found) == len(EXPECTED[name]), found
    for want, got in zip(EXPECTED[name], found, strict=True):
        assert want in got


def test_a_duplicate_name_raises() -> None:
    with pytest.raises(ValueError, match="'central' is already registered"):
        MECHANISMS.register("central")(CentralDP())


def test_an_unknown_name_raises_with_the_known_names() -> None:
    # Prepare
    plan = Plan.from_flat({"privacy.mechanism": "gaussian", "num-server-rounds": 1})

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"`privacy.mechanism` must be one of central, distributed, dp-sgd, local"):
        MECHANISMS.get("gaussian")
    assert compat.problems(plan) == [
        "round 1: `privacy.mechanism` must be one of central, distributed, dp-sgd, local, none, zero-noise; "
        "got 'gaussian'."
    ]


def site(msg: Message) -> Message:
    """A fake site: its delta, then the step of the mechanism the round's spec names."""
    node = msg.metadata.dst_node_id
    spec = msg.content.config_records[keys.SPEC]
    extra = (keys.ROUND, keys.RUN_ID, keys.DP_PLANNED_STEPS)
    cfg = RunConfig.from_flat({k: v for k, v in spec.items() if k not in extra})
    metrics: dict[str, Any] = {keys.NUM_EXAMPLES: 1}
    delta = MECHANISMS.get(cfg.privacy.mechanism).client_step(cfg, raw(node), metrics)
    content = RecordDict({**float32_records(delta, keys.DELTA), keys.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def raw(node: int) -> Arrays:
    return {k: np.full(v.shape, float(node), np.float32) for k, v in GLOBAL.items()}


def test_a_test_only_mechanism_runs_a_round_through_the_real_loop(task_identity: None) -> None:
    # Prepare
    plan = Plan.from_flat(
        {
            "num-server-rounds": 1,
            "server.min-clients": 3,
            "eval.federated": False,
            "privacy.mechanism": "zero-noise",
            "privacy.clip-norm": CLIP,
        }
    )
    compat.check(plan)

    # Execute
    state, rows = run_loop(plan, FakeGrid([1, 2, 3], site))

    # Assert: the mean of the three deltas, each clipped to C by plain scaling (numpy), and the toy's figure
    clipped = [{k: v * min(1.0, CLIP / l2_norm(raw(n))) for k, v in raw(n).items()} for n in (1, 2, 3)]
    for key, value in GLOBAL.items():
        want = value + np.mean([c[key] for c in clipped], axis=0)
        np.testing.assert_allclose(state.global_arrays[key], want, rtol=1e-5)
    assert rows[1]["updated"] is True and rows[1]["zero_noise_std"] == 0.0


@pytest.mark.usefixtures("task_identity")
def test_the_real_site_applies_a_test_only_mechanisms_step(tiny_model: Path) -> None:
    # Prepare: the real ClientApp, a round spec naming the toy
    from fedtune.client.app import app as client_app
    from fedtune.config.presets import preset
    from fedtune.model.adapters import adapter_arrays, init_adapter, wrap_lora
    from fedtune.model.loading import load_base, pick_device
    from fedtune.server.send import round_content

    flat = {
        **preset("tiny"),
        "model.name": str(tiny_model),
        "privacy.mechanism": "zero-noise",
        "privacy.clip-norm": 1e-4,
    }
    cfg = Plan.from_flat(flat).base
    model = wrap_lora(load_base(cfg.model, pick_device("auto")), cfg.lora)
    init_adapter(model, cfg.seed)
    msg = Message(
        round_content(adapter_arrays(model), cfg, 1), dst_node_id=1, message_type=MessageType.TRAIN, group_id="1"
    )
    node = {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    # Execute
    reply = client_app(msg, context)

    # Assert: the delta left the site clipped to the toy's C; no clear metrics under a mechanism that opts out of DP
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    delta = read_arrays(reply.content, keys.DELTA)
    assert 0 < l2_norm(delta) <= 1e-4
    assert keys.TRAIN_LOSS in reply.content.metric_records[keys.METRICS]
