"""Strategies end to end on the tiny preset: every rule, poisoning, FFA-LoRA, heterogeneous ranks.

These run the real server (``run_server``) and the real ClientApp on the in-process ``shared``
backend, so a whole federation takes seconds; the Ray engine is exercised in test_simulation.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from fedtune.client.app import app as client_app
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.core.errors import ConfigError
from fedtune.privacy import compat
from fedtune.server.app import run_server
from fedtune.server.checkpoint import saved_plan
from fedtune.simulations.local import LocalGrid
from fedtune.strategies import STRATEGIES
from fedtune.wire import keys
from fedtune.wire.records import float32_records, read_arrays

ClientFn = Callable[[Message, Context], Message]


class RecordingGrid(LocalGrid):
    """The shared backend, keeping every message sent and a copy of each reply's delta (the server
    releases a reply's arrays once they are aggregated)."""

    def __init__(self, client: ClientFn, num_sites: int) -> None:
        super().__init__(client, num_sites)
        self.log: list[tuple[Message, dict[str, np.ndarray]]] = []

    def _handle(self, msg: Message) -> Message:
        reply = super()._handle(msg)
        has_delta = reply.has_content() and keys.DELTA in reply.content.array_records
        delta = {k: v.copy() for k, v in read_arrays(reply.content, keys.DELTA).items()} if has_delta else {}
        self.log.append((msg, delta))
        return reply


def federate(
    tiny_model: Path, out: Path, flat: dict[str, Any], client: ClientFn = client_app
) -> tuple[list[dict[str, Any]], RecordingGrid]:
    plan = Plan.from_flat(
        {
            **preset("tiny"),
            "model.name": str(tiny_model),
            "output.dir": str(out),
            "simulation.backend": "shared",
            **flat,
        }
    )
    compat.check(plan)
    grid = RecordingGrid(client, plan.base.simulation.num_supernodes)
    run_server(plan, grid)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], grid


def test_every_strategy_runs_two_rounds_in_one_plan(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: one federation whose plan gives each registered strategy two rounds
    names = STRATEGIES.names()
    flat: dict[str, Any] = {
        "num-server-rounds": 2 * len(names),
        "simulation.num-supernodes": 5,
        "server.min-clients": 5,
    }
    for i, name in enumerate(names):
        span = f"{2 * i + 1}-{2 * i + 2}"
        flat[f"plan.{span}.strategy.name"] = name
        if name in ("fedadam", "fedyogi", "fedadagrad"):
            flat[f"plan.{span}.strategy.server-lr"] = 0.01
        if name == "trimmed-mean":
            flat[f"plan.{span}.strategy.trim-fraction"] = 0.2

    # Execute
    rows, _ = federate(tiny_model, tmp_path / "run", flat)

    # Assert
    trained = rows[1:]
    assert [r["spec"]["strategy.name"] for r in trained] == [n for n in names for _ in range(2)]
    assert all(r["updated"] and r["replied"] == 5 and np.isfinite(r["eval_loss"]) for r in trained)
    exact_rows = [r for r in trained if r["spec"]["strategy.name"] == "exact"]
    assert all("exact_reconstruction_error" in r for r in exact_rows)


def poison(mode: str, victim: int = 0) -> ClientFn:
    """A ClientApp whose site ``victim`` sends its delta scaled 100x or sign-flipped."""

    def client(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train" and context.node_config[keys.PARTITION_ID] == victim:
            delta = read_arrays(reply.content, keys.DELTA)
            factor = 100.0 if mode == "scaled" else -1.0
            reply.content.array_records[keys.DELTA] = float32_records(
                {k: v * factor for k, v in delta.items()}, keys.DELTA
            )[keys.DELTA]  # type: ignore[assignment]
        return reply

    return client


ROBUST_RULES = {"median": {}, "trimmed-mean": {"strategy.trim-fraction": 0.2}, "krum": {}}


# One test per rule (12 federations in one test were the suite's longest single chain on a worker)
@pytest.mark.parametrize("name", ["fedavg", *ROBUST_RULES])
def test_robust_rules_resist_a_poisoned_client_and_fedavg_does_not(tiny_model: Path, tmp_path: Path, name: str) -> None:
    # Prepare: one of 5 sites sends its delta scaled 100x or sign-flipped (fedavg: scaled, the
    # attack it is checked to fail under)
    common = {"num-server-rounds": 3, "simulation.num-supernodes": 5, "server.min-clients": 5, "seed": 1}
    flat = {**common, "strategy.name": name, **ROBUST_RULES.get(name, {})}
    modes = ("scaled", "flipped") if name in ROBUST_RULES else ("scaled",)

    # Execute: the rule clean, and under each attack
    clean = federate(tiny_model, tmp_path / f"{name}-clean", flat)[0]
    attacked = {mode: federate(tiny_model, tmp_path / f"{name}-{mode}", flat, poison(mode))[0] for mode in modes}

    # Assert: the clean run learns; a robust rule stays within 10 % of its clean run; fedavg does not
    assert clean[-1]["eval_loss"] < clean[0]["eval_loss"], name
    reference = clean[-1]["eval_loss"]
    for mode in modes:
        loss = attacked[mode][-1]["eval_loss"]
        if name in ROBUST_RULES:
            assert loss <= 1.10 * reference, (name, mode, loss, reference)
        else:
            assert loss > 1.10 * reference, (loss, reference)


def test_ffa_sends_exactly_the_b_matrices(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    flat = {"num-server-rounds": 2, "lora.freeze-a": True, "lora.target-modules": "q_proj,v_proj,up_proj"}

    # Execute
    rows, grid = federate(tiny_model, tmp_path / "ffa", flat)

    # Assert: replies carry only lora_B, sized out x r per module (from the model's layer shapes)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    modules = {n: m for n, m in base.named_modules() if n.split(".")[-1] in ("q_proj", "v_proj", "up_proj")}
    r = 4
    b_bytes = sum(m.out_features * r * 4 for m in modules.values())
    all_bytes = sum((m.in_features + m.out_features) * r * 4 for m in modules.values())
    train = [(m, rep) for m, rep in grid.log if m.metadata.message_type == "train"]
    for _, delta in train:
        assert delta and all(".lora_B." in k for k in delta)
        assert sum(v.nbytes for v in delta.values()) == b_bytes
    sent = read_arrays(train[0][0].content, keys.ADAPTER)
    assert sum(v.nbytes for v in sent.values()) == all_bytes
    assert b_bytes / all_bytes == pytest.approx(
        sum(m.out_features for m in modules.values()) / sum(m.in_features + m.out_features for m in modules.values())
    )
    # A never moves: the final adapter's A equals the round-0 initialization
    first = json.loads((tmp_path / "ffa" / "checkpoints" / "round-000" / "state.json").read_text())["round"]
    assert first == 0
    a0 = load_file(str(tmp_path / "ffa" / "checkpoints" / "round-000" / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "ffa" / "adapter" / "adapter_model.safetensors"))
    for key in a0:
        if ".lora_A." in key:
            np.testing.assert_array_equal(a0[key], a2[key])
        else:
            assert not np.array_equal(a0[key], a2[key])
    assert rows[-1]["bytes_up"] < rows[-1]["bytes_down"]


def test_three_ranks_train_and_each_site_gets_its_own_slice(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    flat = {"num-server-rounds": 2, "lora.r": 8, "lora.alpha": 16, "simulation.site-ranks": "8,4,2"}

    # Execute
    rows, grid = federate(tiny_model, tmp_path / "hetero", flat)

    # Assert: each site's delta has its own rank, and round 2 sends each site its own slice
    want = {1: 8, 2: 4, 3: 2}  # node id = partition id + 1
    for msg, delta in grid.log:
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type != "train":
            continue
        assert {v.shape[0] for k, v in delta.items() if ".lora_A." in k} == {want[node]}
        if msg.metadata.group_id == "2":
            sent = read_arrays(msg.content, keys.ADAPTER)
            assert {v.shape[1] for k, v in sent.items() if ".lora_B." in k} == {want[node]}
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    # The global adapter is saved at the maximum rank and loads with vanilla PEFT
    config = json.loads((tmp_path / "hetero" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), str(tmp_path / "hetero" / "adapter")
    )
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] > 0


def test_killed_and_resumed_run_equals_uninterrupted_run(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: fedadam, so the resumed run also needs the server optimizer's moments back
    flat = {"num-server-rounds": 4, "strategy.name": "fedadam", "strategy.server-lr": 0.01, "seed": 5}

    def dies_in_round_3(msg: Message, context: Context) -> Message:
        if msg.metadata.group_id == "3":
            raise KeyboardInterrupt  # not caught by the grid: the server process "dies"
        return client_app(msg, context)

    # Execute
    federate(tiny_model, tmp_path / "straight", flat)
    with pytest.raises(KeyboardInterrupt):
        federate(tiny_model, tmp_path / "killed", flat, dies_in_round_3)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == [
        "round-000",
        "round-001",
        "round-002",
    ]
    plan = Plan.from_flat({**saved_plan(tmp_path / "killed")})
    run_server(plan, LocalGrid(client_app, plan.base.simulation.num_supernodes), resume=True)

    # Assert
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    for key in straight:
        np.testing.assert_allclose(resumed[key], straight[key], atol=1e-6, rtol=0)
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]


def test_a_finished_run_is_not_overwritten(tiny_model: Path, tmp_path: Path) -> None:
    federate(tiny_model, tmp_path / "once", {"num-server-rounds": 1})
    with pytest.raises(ConfigError, match="already holds a run; resume it with --resume"):
        federate(tiny_model, tmp_path / "once", {"num-server-rounds": 1})
