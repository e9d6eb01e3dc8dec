"""A data-parallel site (2 processes, gloo on the CPU) replies with the delta of a 1-process site.

Both go through the real ClientApp; the only difference is the site's node config
``train.num-processes = 2``, which makes the ClientApp spawn a second rank and train with DDP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from fedtune.client.app import app as client_app
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.core.arrays import Arrays
from fedtune.model.adapters import adapter_arrays, init_adapter, wrap_lora
from fedtune.model.loading import load_base, pick_device
from fedtune.server.send import round_content
from fedtune.wire import keys
from fedtune.wire.records import arrays_from_record

NODE = {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}
# 5 examples a micro-batch (uneven shards of 2 and 3 examples of uneven lengths), 2 micro-batches a
# step, 3 steps. FedProx makes the gradient's scale matter, not only its direction; no dropout (each
# rank draws its own masks); a small lr, since AdamW turns fp32 summation-order noise on near-zero
# gradient entries into differences of up to ~lr.
EXACT: dict[str, Any] = {
    "lora.dropout": 0.0,
    "strategy.name": "fedprox",
    "strategy.proximal-mu": 10.0,
    "train.batch-size": 5,
    "train.grad-accum-steps": 2,
    "train.local-steps": 3,
    "train.lr": 1e-3,
    "train.max-grad-norm": 0.0,
}


def train_message(tiny_model: Path, **flat: Any) -> Message:
    """A round-1 train message whose global adapter has a non-zero B (as after earlier rounds)."""
    cfg = Plan.from_flat({**preset("tiny"), "model.name": str(tiny_model), **flat}).base
    model = wrap_lora(load_base(cfg.model, pick_device("auto")), cfg.lora)
    init_adapter(model, cfg.seed)
    rng = np.random.default_rng(1)
    arrays = {
        k: v + (0.05 * rng.standard_normal(v.shape)).astype(np.float32) if "lora_B" in k else v
        for k, v in adapter_arrays(model).items()
    }
    return Message(round_content(arrays, cfg, 1), dst_node_id=1, message_type=MessageType.TRAIN, group_id="1")


def delta(msg: Message, node_config: dict[str, Any]) -> Arrays:
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return arrays_from_record(reply.content.array_records[keys.DELTA])


@pytest.mark.usefixtures("task_identity")
def test_a_two_process_site_gives_the_delta_of_a_one_process_site(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the settings of EXACT
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned rank inherits it
    msg = train_message(tiny_model, **EXACT)

    # Execute
    single = delta(msg, NODE)
    parallel = delta(msg, {**NODE, "train.num-processes": 2})

    # Assert: the same delta to 1e-5, for a delta far larger than that
    assert single.keys() == parallel.keys() and single
    assert max(float(np.abs(single[k]).max()) for k in single) > 1e-3
    assert max(float(np.abs(single[k] - parallel[k]).max()) for k in single) < 1e-5


@pytest.mark.usefixtures("task_identity")
def test_data_parallel_with_dp_sgd_is_refused_at_the_site(tiny_model: Path) -> None:
    # Prepare
    msg = train_message(tiny_model, **{"privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0})
    context = Context(
        run_id=1, node_id=1, node_config={**NODE, "train.num-processes": 2}, state=RecordDict(), run_config={}
    )

    # Execute
    reply = client_app(msg, context)

    # Assert: an error reply naming the key, nothing trained
    assert reply.has_error()
    assert "`train.num-processes` is not supported with `privacy.mechanism` = dp-sgd" in reply.error.reason
