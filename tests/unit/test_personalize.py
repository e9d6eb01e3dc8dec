"""Personalization's pieces: FedSA-LoRA key sets, the site's kept B (context state and state dir),
the plan checker's refusals and the trust statement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedtune.client import store
from fedtune.config import LoraSection, RunConfig
from fedtune.config.plan import Plan
from fedtune.core.errors import ConfigError, IncompatibleComponentsError
from fedtune.model.methods import load_for, wrap
from fedtune.model.share import kept_keys, personal, sent_keys
from fedtune.privacy import compat
from fedtune.server.report import privacy_summary
from fedtune.server.state import ServerState
from fedtune.wire import keys

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
ADAPTER = {A: np.ones((2, 3), np.float32), B: np.zeros((3, 2), np.float32), "m.score.weight": np.ones(3, np.float32)}


@pytest.mark.parametrize(
    ("lora", "sent", "kept"),
    [
        (LoraSection(), [A, B, "m.score.weight"], []),
        (LoraSection(freeze_a=True), [B, "m.score.weight"], []),
        (LoraSection(share="a"), [A, "m.score.weight"], [B]),
        (LoraSection(freeze_b=True), [A, "m.score.weight"], []),
    ],
)
def test_each_setting_sends_and_keeps_its_part(lora: LoraSection, sent: list[str], kept: list[str]) -> None:
    assert sent_keys(ADAPTER, lora) == sent
    assert kept_keys(ADAPTER, lora) == kept
    if not (lora.freeze_a or lora.freeze_b):  # what is not frozen is either sent or kept
        assert sorted(sent_keys(ADAPTER, lora) + kept_keys(ADAPTER, lora)) == sorted(ADAPTER)


def test_alternate_freezes_a_in_odd_rounds_and_b_in_even_rounds() -> None:
    # Prepare
    plan = Plan.from_flat({"num-server-rounds": 4, "lora.alternate": True})

    # Execute
    frozen = [(plan.for_round(r).lora.freeze_a, plan.for_round(r).lora.freeze_b) for r in range(1, 5)]

    # Assert: B, A, B, A are trained and sent; the base config (round 0, evaluation only) freezes nothing
    assert frozen == [(True, False), (False, True), (True, False), (False, True)]
    assert [sent_keys(ADAPTER, plan.for_round(r).lora)[0] for r in (1, 2)] == [B, A]
    assert not plan.base.lora.freeze_a and not plan.base.lora.freeze_b
    compat.check(plan)


def test_a_plan_alternates_only_in_its_rounds() -> None:
    # Prepare / Execute
    plan = Plan.from_flat({"num-server-rounds": 5, "plan.3-4.lora.alternate": True})
    frozen = [(plan.for_round(r).lora.freeze_a, plan.for_round(r).lora.freeze_b) for r in range(1, 6)]

    # Assert
    assert frozen == [(False, False), (False, False), (True, False), (False, True), (False, False)]
    compat.check(plan)
    exact = Plan.from_flat({"num-server-rounds": 5, "plan.3-4.lora.alternate": True, "plan.4.strategy.name": "exact"})
    assert compat.problems(exact) == [
        "`lora.alternate` (RoLoRA) freezes A in odd rounds and B in even rounds, and `strategy.name` = exact "
        "re-factorizes both; use a fedavg-family strategy."
    ]


def test_the_personal_adapter_is_the_global_one_with_the_own_b() -> None:
    own = {B: np.full((3, 2), 7, np.float32)}
    merged = personal(ADAPTER, own)
    assert merged[A] is ADAPTER[A] and merged[B] is own[B] and sorted(merged) == sorted(ADAPTER)


def _context(state_dir: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={keys.STATE_DIR: str(state_dir)}, state=RecordDict(), run_config={})


def test_the_own_b_survives_a_restart_through_the_state_dir(tmp_path: Path) -> None:
    # Prepare
    first, own = _context(tmp_path), {B: np.arange(6, dtype=np.float32).reshape(3, 2)}

    # Execute: a new process (fresh context state) with the same state dir; another run id has nothing
    store.keep(own, first, "run1", "site 0", 1)
    restarted = store.restore(_context(tmp_path), "run1", "site 0", 1)
    other_run = store.restore(_context(tmp_path), "run2", "site 0", 1)

    # Assert
    assert restarted is not None and other_run is None
    np.testing.assert_array_equal(restarted[B], own[B])
    assert store.restore(_context(tmp_path / "elsewhere"), "run1", "site 0", 1) is None
    assert store.restore(_context(tmp_path), "run1", "site 0", 0) is None  # round 1 starts from no B


def test_a_replayed_round_starts_from_the_b_of_the_round_before(tmp_path: Path) -> None:
    # Prepare: rounds 1-3 kept; a resumed server replays round 3
    context = _context(tmp_path)
    for rnd in (1, 2, 3):
        store.keep({B: np.full((3, 2), rnd, np.float32)}, context, "r", "site 0", rnd)

    # Execute
    in_process = store.restore(context, "r", "site 0", 2)
    restarted = store.restore(_context(tmp_path), "r", "site 0", 2)
    latest = store.restore(_context(tmp_path), "r", "site 0", 3)

    # Assert: round 2's B for the replay, round 3's for the next; only the last two rounds are kept
    assert in_process is not None and restarted is not None and latest is not None
    assert (in_process[B] == 2).all() and (restarted[B] == 2).all() and (latest[B] == 3).all()
    kept = sorted(p.name.rsplit("-r", 1)[1] for p in tmp_path.glob("*.personal-r*"))
    assert kept == ["2.safetensors", "3.safetensors"]
    assert len(context.state.array_records) == 2
    assert store.restore(_context(tmp_path), "r", "site 0", 1) is None


def test_a_site_sampled_rarely_keeps_the_b_a_replay_needs(tmp_path: Path) -> None:
    # Prepare: the site trained in rounds 2 and 7 only
    context = _context(tmp_path)
    for rnd in (2, 7):
        store.keep({B: np.full((3, 2), rnd, np.float32)}, context, "r", "site 0", rnd)

    # Execute: a restarted site asked to replay round 7
    replay = store.restore(_context(tmp_path), "r", "site 0", 6)

    # Assert
    assert replay is not None and (replay[B] == 2).all()


def test_context_state_wins_over_the_file_and_a_bad_file_names_itself(tmp_path: Path) -> None:
    # Prepare
    context = _context(tmp_path)
    store.keep({B: np.ones((3, 2), np.float32)}, context, "r", "site 1", 1)
    path = store.state_path(context, "r", "site 1", 1)
    path.write_bytes(b"not safetensors")

    # Execute / Assert: the running process reads its context; a restarted one reads the file
    restored = store.restore(context, "r", "site 1", 1)
    assert restored is not None and restored[B].sum() == 6
    with pytest.raises(ConfigError, match=f"site 1: cannot read its own adapter part {path}"):
        store.restore(_context(tmp_path), "r", "site 1", 1)


@pytest.mark.parametrize(
    ("flat", "line"),
    [
        (
            {"lora.share": "a", "lora.freeze-a": True},
            "`lora.share` = a (FedSA-LoRA) sends only the A matrices, which `lora.freeze-a` (FFA-LoRA) keeps fixed: "
            "no site would send anything; use one of them.",
        ),
        (
            {"lora.share": "a", "strategy.name": "exact"},
            "`lora.share` = a (FedSA-LoRA) sends only the A matrices and keeps each site's B, and `strategy.name` = "
            "exact needs both; use a fedavg-family strategy.",
        ),
        (
            {"lora.share": "a", "peft.method": "ia3"},
            "`lora.share` = a (FedSA-LoRA) sends only the A matrices of a LoRA adapter; it needs `peft.method` = "
            "lora, got ia3.",
        ),
        (
            {"lora.alternate": True, "strategy.name": "exact"},
            "`lora.alternate` (RoLoRA) freezes A in odd rounds and B in even rounds, and `strategy.name` = exact "
            "re-factorizes both; use a fedavg-family strategy.",
        ),
        (
            {"lora.alternate": True, "lora.freeze-a": True},
            "`lora.alternate` (RoLoRA) freezes A in odd rounds and B in even rounds itself; unset `lora.freeze-a` "
            "and `lora.freeze-b`.",
        ),
        (
            {"lora.alternate": True, "lora.share": "a"},
            "`lora.alternate` (RoLoRA) freezes A in odd rounds and B in even rounds, and `lora.share` = a "
            "(FedSA-LoRA) sends only the A matrices: its B rounds would send nothing; use one of them.",
        ),
        (
            {"lora.freeze-b": True, "lora.freeze-a": True},
            "`lora.freeze-a` and `lora.freeze-b` together freeze the whole adapter; use one of them.",
        ),
        (
            {"personalize.local-steps": 5, "privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0},
            "`personalize.local-steps` trains each site's personal adapter without DP-SGD, outside the sample-level "
            "guarantee of `privacy.mechanism` = dp-sgd; set it to 0.",
        ),
    ],
)
def test_combinations_that_cannot_compose_are_refused_in_one_line(flat: dict[str, object], line: str) -> None:
    plan = Plan.from_flat({"num-server-rounds": 2, **flat})
    with pytest.raises(IncompatibleComponentsError) as info:
        compat.check(plan)
    assert line in str(info.value).split(" | ") or f"rounds 1-2: {line}" in str(info.value).split(" | ")


def test_what_a_site_keeps_is_fixed_for_the_whole_run() -> None:
    with pytest.raises(ConfigError, match=r"`lora\.share` is fixed for the whole run"):
        Plan.from_flat({"num-server-rounds": 2, "plan.2-.lora.share": "a"})
    late = Plan.from_flat({"num-server-rounds": 2, "privacy.mechanism": "dp-sgd", "plan.2.personalize.local-steps": 3})
    assert any("`personalize.local-steps` trains" in p for p in compat.problems(late))  # what the last round says


@pytest.mark.parametrize(
    "flat",
    [
        {"lora.share": "a"},
        {
            "lora.share": "a",
            "privacy.mechanism": "central",
            "privacy.noise-multiplier": 1.0,
            "strategy.weighting": "uniform",
        },
        {"lora.share": "a", "secagg.protocol": "secagg", "server.min-clients": 3},
        {
            "personalize.local-steps": 3,
            "privacy.mechanism": "local",
            "privacy.noise-multiplier": 1.0,
            "strategy.weighting": "uniform",
        },
    ],
)
def test_fedsa_and_local_adaptation_compose_with_what_is_sent(flat: dict[str, object]) -> None:
    compat.check(Plan.from_flat({"num-server-rounds": 2, **flat}))


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"lora.share": "a", "privacy.mechanism": "dp-sgd"}, "covered by the sample-level guarantee only"),
        ({"lora.share": "a", "privacy.mechanism": "central"}, "only a sample-level `privacy.mechanism` = dp-sgd"),
        ({"personalize.local-steps": 2, "privacy.mechanism": "local"}, "does not cover the personal adapter"),
        ({"privacy.mechanism": "central"}, None),
    ],
)
def test_the_trust_statement_says_what_covers_a_personal_adapter(flat: dict[str, object], needle: str | None) -> None:
    plan = Plan.from_flat({"num-server-rounds": 2, "privacy.noise-multiplier": 1.0, **flat})
    covers = privacy_summary(plan, ServerState(round=0, global_arrays={}, rng=np.random.default_rng()))["covers"]
    if needle is None:
        assert "personal adapter" not in covers
    else:
        assert needle in covers


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"lora.share": "b"}, r"`lora\.share` must be one of a, ab|`lora\.share` must be one of ab, a"),
        ({"personalize.local-steps": -1}, r"`personalize\.local-steps` must be >= 0, got -1"),
    ],
)
def test_bad_personalization_values_name_their_key(flat: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat(flat)


def test_freeze_b_trains_only_the_a_matrices(tiny_model: Path) -> None:
    # Prepare
    cfg = RunConfig.from_flat({"model.name": str(tiny_model), "lora.freeze-b": True, "train.device": "cpu"})

    # Execute
    model = wrap(load_for(cfg, torch.device("cpu")), cfg)

    # Assert
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n for n in trainable)
    assert any(".lora_B." in n for n, _ in model.named_parameters())
