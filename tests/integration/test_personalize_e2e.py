"""Personalization end to end on the tiny preset (shared backend, real server and ClientApp): FedSA-LoRA
(``lora.share = a``) aggregates only A and each site keeps its own B, across a restart too; local
adaptation (``personalize.local-steps``) evaluates a personal adapter beside the global one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from fedtune.client.app import app as client_app
from fedtune.client.store import STATE_KEY
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.privacy import compat
from fedtune.server.app import run_server
from fedtune.simulations.local import LocalGrid
from fedtune.wire import keys
from fedtune.wire.records import arrays_from_record, read_arrays


class Recorder(LocalGrid):
    """The shared backend, keeping each message with a copy of its reply's arrays and metrics; with
    ``restart_at`` every site loses its ``context.state`` (a restarted process) before that round."""

    def __init__(self, num_sites: int, state_dir: Path | None = None, restart_at: int = 0) -> None:
        super().__init__(client_app, num_sites)
        self.log: list[tuple[Message, dict[str, np.ndarray], dict[str, Any]]] = []
        self.restart_at, self.restarted = restart_at, False
        if state_dir is not None:
            for context in self.contexts.values():
                context.node_config[keys.STATE_DIR] = str(state_dir)

    def _handle(self, msg: Message) -> Message:
        rnd = int(msg.content.config_records[keys.SPEC][keys.ROUND])
        if self.restart_at and rnd == self.restart_at and not self.restarted:
            self.restarted = True
            self.contexts = {
                n: Context(run_id=1, node_id=n, node_config=c.node_config, state=RecordDict(), run_config={})
                for n, c in self.contexts.items()
            }
        reply = super()._handle(msg)
        arrays = {
            k: v.copy() for name in reply.content.array_records for k, v in read_arrays(reply.content, name).items()
        }
        metrics = dict(reply.content.metric_records.get(keys.METRICS, {}))
        self.log.append((msg, arrays, metrics))
        return reply


def federate(tiny_model: Path, out: Path, grid: Recorder, flat: dict[str, Any]) -> None:
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
    run_server(plan, grid)


def trains(grid: Recorder, rnd: int) -> list[tuple[Message, dict[str, np.ndarray], dict[str, Any]]]:
    return [
        e
        for e in grid.log
        if e[0].metadata.message_type == "train" and e[0].content.config_records["spec"]["round"] == rnd
    ]


def adapter_sent(msg: Message) -> dict[str, np.ndarray]:
    return read_arrays(msg.content, keys.ADAPTER)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))  # the sites' default state dir


def test_fedsa_sends_a_only_and_the_global_a_is_the_weighted_mean(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    grid = Recorder(3)

    # Execute
    federate(tiny_model, tmp_path / "run", grid, {"lora.share": "a"})

    # Assert: nothing any site sends holds a B matrix; train replies hold exactly the A matrices
    sent = adapter_sent(trains(grid, 1)[0][0])
    a_keys = sorted(k for k in sent if ".lora_A." in k)
    for msg, arrays, _ in grid.log:
        assert not any(".lora_B." in k for k in arrays), msg.metadata.message_type
    for _, delta, _ in trains(grid, 1) + trains(grid, 2):
        assert sorted(delta) == a_keys
    # numpy reference: round 2's global A is the example-weighted mean of the sites' A after round 1
    replies = trains(grid, 1)
    weights = np.array([m[keys.NUM_EXAMPLES] for _, _, m in replies], dtype=np.float64)
    after = adapter_sent(trains(grid, 2)[0][0])
    for key in a_keys:
        local = np.stack([sent[key].astype(np.float64) + d[key] for _, d, _ in replies])  # each site's A
        reference = np.tensordot(weights / weights.sum(), local, axes=1)
        np.testing.assert_allclose(after[key], reference, rtol=1e-5, atol=1e-6)
    for key in sent:
        if ".lora_B." in key:  # the global B never moves from its init (zeros)
            np.testing.assert_array_equal(after[key], sent[key])
            assert not after[key].any()
    # each site's own B: kept in its context, trained, and in its personal PEFT folder with the final global A
    final = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    run_id = trains(grid, 2)[0][0].content.config_records[keys.SPEC][keys.RUN_ID]
    for pid, context in enumerate(grid.contexts.values()):
        assert sorted(context.state.array_records) == [f"{STATE_KEY}.{run_id}.r1", f"{STATE_KEY}.{run_id}.r2"]
        own = arrays_from_record(context.state.array_records[f"{STATE_KEY}.{run_id}.r2"])
        assert sorted(own) == sorted(k for k in sent if ".lora_B." in k) and all(v.any() for v in own.values())
        folder = tmp_path / "run" / "sites" / f"site-{pid}" / "adapter"
        saved = load_file(str(folder / "adapter_model.safetensors"))
        for key, value in saved.items():
            expected = final[key] if ".lora_A." in key else own[key]
            np.testing.assert_array_equal(value, expected)
    # the folder is vanilla PEFT; sites.json holds both losses per site and their spread
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "sites" / "site-0" / "adapter"))
    assert isinstance(model, PeftModel)
    report = json.loads((tmp_path / "run" / "sites.json").read_text())
    entries = [s["eval"] for s in report["sites"].values()]
    assert len(entries) == 3 and all(e["round"] == 2 for e in entries)
    assert set(report["spread"]) >= {"eval_loss", "personal_eval_loss"}
    personal = [e["personal_eval_loss"] for e in entries]
    assert report["spread"]["personal_eval_loss"]["max"] == max(personal)
    assert np.mean(personal) < np.mean([e["eval_loss"] for e in entries])


def test_a_restarted_site_continues_with_its_own_b(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: one run without a restart, one where every site restarts before round 2 (its state dir
    # keeps its B), and one where the restart also loses the state dir
    flat = {"lora.share": "a", "eval.federated": False}
    runs = {
        name: Recorder(3, tmp_path / f"state-{name}", restart_at=2 if name != "steady" else 0)
        for name in ("steady", "restarted", "wiped")
    }

    # Execute
    federate(tiny_model, tmp_path / "steady", runs["steady"], flat)
    federate(tiny_model, tmp_path / "restarted", runs["restarted"], flat)
    wiped = runs["wiped"]
    original = wiped._handle

    def lose_files(msg: Message) -> Message:
        if msg.content.config_records[keys.SPEC][keys.ROUND] == 2 and not wiped.restarted:
            for path in (tmp_path / "state-wiped").glob("*.personal-r*.safetensors"):
                path.unlink()
        return original(msg)

    wiped._handle = lose_files  # type: ignore[method-assign]
    federate(tiny_model, tmp_path / "wiped", wiped, flat)

    # Assert: the restarted sites send exactly the round-2 deltas of the steady run; losing B changes them
    assert runs["restarted"].restarted and wiped.restarted
    assert all(STATE_KEY in n for c in runs["restarted"].contexts.values() for n in c.state.array_records)
    steady, restarted, lost = (trains(runs[n], 2) for n in ("steady", "restarted", "wiped"))
    for (_, d1, _), (_, d2, _), (_, d3, _) in zip(steady, restarted, lost, strict=True):
        for key in d1:
            np.testing.assert_array_equal(d1[key], d2[key])
        assert any(not np.allclose(d1[k], d3[k]) for k in d1)


def test_local_adaptation_evaluates_a_personal_adapter_after_the_last_round(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    grid = Recorder(3)

    # Execute
    federate(tiny_model, tmp_path / "run", grid, {"personalize.local-steps": 4})

    # Assert: only the last round's eval carries a personal loss; both go to sites.json, with folders
    evals = [
        (e[0].content.config_records["spec"]["round"], e[2])
        for e in grid.log
        if e[0].metadata.message_type == "evaluate"
    ]
    assert {rnd for rnd, m in evals if keys.PERSONAL_EVAL_LOSS in m} == {2}
    report = json.loads((tmp_path / "run" / "sites.json").read_text())
    entries = [s["eval"] for s in report["sites"].values()]
    assert all("personal_eval_loss" in e and "eval_loss" in e for e in entries)
    assert np.mean([e["personal_eval_loss"] for e in entries]) < np.mean([e["eval_loss"] for e in entries])
    final = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    for pid in range(3):
        saved = load_file(str(tmp_path / "run" / "sites" / f"site-{pid}" / "adapter" / "adapter_model.safetensors"))
        assert sorted(saved) == sorted(final) and any(not np.array_equal(saved[k], final[k]) for k in final)


def test_fedsa_under_central_dp_noises_what_is_sent_and_says_what_it_covers(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    flat = {
        "lora.share": "a",
        "privacy.mechanism": "central",
        "privacy.noise-multiplier": 0.5,
        "strategy.weighting": "uniform",
        "eval.federated": True,
    }
    grid = Recorder(3)

    # Execute
    federate(tiny_model, tmp_path / "run", grid, flat)

    # Assert: sites send A only (clipped to `privacy.clip-norm`); the global B never moves; the trust
    # statement says a personal adapter is not covered
    sent = adapter_sent(trains(grid, 1)[0][0])
    for _, delta, _ in trains(grid, 1) + trains(grid, 2):
        assert delta and all(".lora_A." in k for k in delta)
        assert np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in delta.values())) <= 1.0 + 1e-4
    after = adapter_sent(trains(grid, 2)[0][0])
    assert all(not after[k].any() for k in sent if ".lora_B." in k)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "does not cover the personal adapter" in summary["privacy"]["covers"]
    report = json.loads((tmp_path / "run" / "sites.json").read_text())
    assert all("personal_eval_loss" in s["eval"] for s in report["sites"].values())
