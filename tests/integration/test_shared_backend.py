"""The in-process ``shared`` backend at scale: 50 sites on one resident model, and site results that
do not depend on which sites ran before them in the same process.

Equality with Flower's Ray engine for the same seed is checked in test_simulation.py, which already
runs the Ray federation; peak memory for 2 against 50 sites is measured in
benchmarks/shared_memory.py (BENCHMARKS.md), not here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from safetensors.numpy import load_file

from fedtune.client.app import app as client_app
from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.model.adapters import adapter_arrays, init_adapter, wrap_lora
from fedtune.model.loading import load_base, pick_device
from fedtune.server.app import run_server
from fedtune.server.send import round_content
from fedtune.simulations.local import LocalGrid
from fedtune.wire import keys
from fedtune.wire.records import read_arrays

SITES = 50


def test_fifty_sites_run_one_round_and_every_reply_is_aggregated(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: 50 sites of 20 demo rows each (iid), one local step, no federated eval; keep a copy of
    # each delta and its weight as the site sent them (the server drops a reply once it is folded in)
    out = tmp_path / "run"
    flat: dict[str, Any] = {
        **preset("tiny"),
        "model.name": str(tiny_model),
        "output.dir": str(out),
        "simulation.backend": "shared",
        "simulation.num-supernodes": SITES,
        "num-server-rounds": 1,
        "data.partitioner": "iid",
        "train.local-steps": 1,
        "eval.federated": False,
        "eval.centralized": False,
    }
    sent: list[tuple[dict[str, np.ndarray], int]] = []

    def client(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        delta = read_arrays(reply.content, keys.DELTA)
        sent.append(
            (
                {k: v.copy() for k, v in delta.items()},
                int(reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES]),
            )
        )
        return reply

    cfg = RunConfig.from_flat(flat)
    peft = wrap_lora(load_base(cfg.model, pick_device("auto")), cfg.lora)  # the process's resident wrapper
    adapters = len(peft.peft_config)

    # Execute
    run_server(Plan.from_flat(flat), LocalGrid(client, SITES))

    # Assert: 50 replies, and the new global adapter is the start plus their example-weighted mean
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (rows[1]["sampled"], rows[1]["replied"], rows[1]["failed"]) == (SITES, SITES, 0)
    assert len(sent) == SITES
    start = load_file(str(out / "checkpoints" / "round-000" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    total = sum(w for _, w in sent)
    for key, value in start.items():
        mean = sum(d[key].astype(np.float64) * w for d, w in sent) / total
        np.testing.assert_allclose(final[key], value + mean, rtol=0, atol=1e-6, err_msg=key)
    assert len(peft.peft_config) == adapters  # one shared adapter slot, not one per site


def _train_message(cfg: RunConfig, arrays: dict[str, np.ndarray], node: int) -> Message:
    content = round_content(arrays, cfg, 1, {keys.RUN_ID: "order"})
    return Message(content, dst_node_id=node, message_type="train", group_id="1")


def test_a_sites_update_does_not_depend_on_the_sites_before_it(tiny_model: Path) -> None:
    # Prepare: LoRA dropout on, so the torch RNG matters as well as the data order
    flat = {**preset("tiny"), "model.name": str(tiny_model), "lora.dropout": 0.1, "simulation.num-supernodes": 3}
    cfg = RunConfig.from_flat(flat)
    model = wrap_lora(load_base(cfg.model, pick_device("auto")), cfg.lora)
    init_adapter(model, cfg.seed)
    start = adapter_arrays(model)

    def delta_of_last(order: list[int]) -> dict[str, np.ndarray]:
        grid = LocalGrid(client_app, 3)
        replies = [grid.send_and_receive([_train_message(cfg, start, node)])[0] for node in order]  # type: ignore[index]
        return {k: v.copy() for k, v in read_arrays(replies[-1].content, keys.DELTA).items()}

    # Execute: site 3 alone, then after the two other sites
    alone = delta_of_last([3])
    after_others = delta_of_last([1, 2, 3])

    # Assert
    assert alone.keys() == after_others.keys()
    for key in alone:
        np.testing.assert_array_equal(alone[key], after_others[key], err_msg=key)
    assert any(np.abs(v).max() > 0 for v in alone.values())
