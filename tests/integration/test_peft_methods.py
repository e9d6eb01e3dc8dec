"""Every ``peft.method`` federated: 2 tiny rounds (the server dies in round 2 and resumes), and
the output loads with vanilla PEFT (or ``from_pretrained`` for bitfit / full) holding exactly the
global state that plain FedAvg of the deltas the sites sent gives (LoRA-SB: its cores folded into B).

The runs use the real server (``run_server``) and the real ClientApp on the in-process ``shared``
backend, as tests/integration/test_strategies_e2e.py does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from fedtune.client.app import app as client_app
from fedtune.config import PEFT_METHODS
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.model.adapters import load_adapter_arrays
from fedtune.model.methods import METHODS, load_for, wrap
from fedtune.model.sb import CORE, fold
from fedtune.server.app import run_server
from fedtune.server.checkpoint import saved_plan
from fedtune.simulations.local import LocalGrid
from fedtune.wire import keys
from fedtune.wire.records import read_arrays

Arrays = dict[str, np.ndarray]


class RecordingGrid(LocalGrid):
    """The shared backend, keeping a copy of what each train round sent and received; with
    ``die_in`` set, the server "dies" when that round's first train message goes out."""

    def __init__(self, num_sites: int, die_in: str = "") -> None:
        super().__init__(client_app, num_sites)
        self.die_in = die_in
        self.sent: dict[str, Arrays] = {}
        self.replies: dict[str, list[tuple[Arrays, float]]] = {}
        self.frame: Arrays = {}

    def _handle(self, msg: Message) -> Message:
        sent = read_arrays(msg.content, keys.ADAPTER) if keys.ADAPTER in msg.content.array_records else {}
        self.frame.update({k: v.copy() for k, v in sent.items() if CORE not in k})  # LoRA-SB's A and B: once
        if msg.metadata.message_type != MessageType.TRAIN:
            return super()._handle(msg)
        rnd = msg.metadata.group_id
        if rnd == self.die_in:
            raise KeyboardInterrupt  # not caught by the grid: the server process "dies"
        self.sent.setdefault(rnd, {**self.frame, **{k: v.copy() for k, v in sent.items()}})
        reply = super()._handle(msg)
        delta = {k: v.copy() for k, v in read_arrays(reply.content, keys.DELTA).items()}
        examples = float(reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES])  # type: ignore[arg-type]
        self.replies.setdefault(rnd, []).append((delta, examples))
        return reply


def fedavg(start: Arrays, rounds: list[list[tuple[Arrays, float]]]) -> Arrays:
    """Reference: start + the example-weighted mean delta of each round, in float64 (only the keys the
    sites sent move: LoRA-SB sends its cores only)."""
    state = {k: v.astype(np.float64) for k, v in start.items()}
    for replies in rounds:
        total = sum(w for _, w in replies)
        for key in replies[0][0]:
            state[key] += sum(w * d[key].astype(np.float64) for d, w in replies) / total
    return state


def federate(model_path: Path, out: Path, method: str) -> tuple[Arrays, Arrays]:
    """Round 1, a server death in round 2, a resume that finishes round 2; returns the initial
    global state and the reference final state."""
    flat: dict[str, Any] = {
        **preset("tiny"),
        "model.name": str(model_path),
        "output.dir": str(out),
        "simulation.backend": "shared",
        "simulation.num-supernodes": 2,
        "server.min-clients": 2,
        "train.local-steps": 1,
        "data.max-eval-examples": 8,
        "eval.max-new-tokens": 4,
        "peft.method": method,
        "peft.num-virtual-tokens": 4,
    }
    plan = Plan.from_flat(flat)
    first = RecordingGrid(2, die_in="2")
    with pytest.raises(KeyboardInterrupt):
        run_server(plan, first)
    second = RecordingGrid(2)
    run_server(Plan.from_flat(saved_plan(out)), second, resume=True)
    return first.sent["1"], fedavg(first.sent["1"], [first.replies["1"], second.replies["2"]])


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_each_method_federates_resumes_and_loads_with_vanilla_tools(
    method: str, tiny_model: Path, tiny_model_biases: Path, tmp_path: Path
) -> None:
    # Prepare: bitfit needs a model with biases (Llama has none by default)
    base_path = tiny_model_biases if method == "bitfit" else tiny_model
    out = tmp_path / "run"
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 61]])

    # Execute
    start, expected = federate(base_path, out, method)
    base = AutoModelForCausalLM.from_pretrained(str(base_path)).eval()
    if METHODS[method].peft:
        vanilla = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        saved = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(vanilla).items()}
    else:
        vanilla = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
        saved = {k: p.detach().numpy() for k, p in vanilla.named_parameters() if k in expected}
    cfg = Plan.from_flat(saved_plan(out)).base
    ours = wrap(load_for(cfg, torch.device("cpu")), cfg)
    load_adapter_arrays(ours, {k: v.astype(np.float32) for k, v in expected.items()})
    with torch.no_grad():
        theirs_logits = vanilla(input_ids=ids).logits[:, -ids.shape[1] :]
        ours_logits = ours.eval()(input_ids=ids).logits[:, -ids.shape[1] :]

    # Assert: the saved trainable state is the FedAvg of the deltas sent (LoRA-SB's cores folded into B:
    # a vanilla LoRA folder), and it has moved
    if method == "lora-sb":
        assert all(CORE in k for k in expected if not np.array_equal(expected[k], start[k]))
    assert sorted(saved) == sorted(fold(expected))
    for key, value in fold(expected).items():
        np.testing.assert_allclose(saved[key], value, atol=1e-5, rtol=0, err_msg=key)
    assert max(float(np.abs(expected[k] - start[k]).max()) for k in expected) > 1e-4
    torch.testing.assert_close(theirs_logits, ours_logits, rtol=1e-4, atol=1e-4)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["failed"] == 0 for r in rows)
    if method == "bitfit":  # only the biases moved; every other weight is the base model's
        for name, param in vanilla.named_parameters():
            if name not in expected:
                torch.testing.assert_close(param, base.get_parameter(name), rtol=0, atol=0)


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if m != "lora" and not spec.no_dp_sgd])
def test_dp_sgd_runs_with_the_methods_opacus_supports(
    method: str, tiny_model: Path, tiny_model_biases: Path, tmp_path: Path
) -> None:
    # Prepare
    out = tmp_path / "run"
    flat = {
        **preset("tiny"),
        "model.name": str(tiny_model_biases if method == "bitfit" else tiny_model),
        "output.dir": str(out),
        "simulation.backend": "shared",
        "simulation.num-supernodes": 2,
        "server.min-clients": 2,
        "train.local-steps": 1,
        "eval.federated": False,
        "peft.method": method,
        "peft.num-virtual-tokens": 4,
        "privacy.mechanism": "dp-sgd",
        "privacy.noise-multiplier": 1.0,
    }

    # Execute
    extra = run_server(Plan.from_flat(flat), LocalGrid(client_app, 2))

    # Assert: every round updated the global state and the sites' epsilon is reported
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["updated"] for r in rows[1:]] == [True, True] and all(r["failed"] == 0 for r in rows)
    assert len(extra["privacy"]["sites"]) == 2 and all(float(e) > 0 for e in extra["privacy"]["sites"].values())
