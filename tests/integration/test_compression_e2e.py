"""Compressed updates end to end on the tiny preset (real server loop, real ClientApp, shared backend):
the plan switches the encoding per round, the sizes are what the codec says, top-k's residual lives
in each site's context state, and the result stays close to the uncompressed federation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedtune.client.compress import RESIDUAL_KEY
from fedtune.config import CompressionConfig
from fedtune.core.arrays import Arrays
from fedtune.model.lora import sent_keys
from fedtune.server.checkpoint import load, round_dir
from fedtune.wire import keys
from fedtune.wire.codec import FLOAT32, PACKED, Scheme
from fedtune.wire.records import encoded_bytes, read_arrays
from tests.integration.test_strategies_e2e import RecordingGrid, federate

BASE = {"num-server-rounds": 4, "simulation.num-supernodes": 3, "server.min-clients": 3, "seed": 2}


def test_per_round_compression_stays_close_to_float32_at_a_fraction_of_the_bytes(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Prepare: round 1 int8, rounds 2-3 top-k, round 4 int4; the global adapter goes down as int8
    plan = {
        **BASE,
        "compression.downlink": "int8",
        "compression.block-size": 64,
        "plan.1.compression.uplink": "int8",
        "plan.2-3.compression.uplink": "topk",
        "plan.2-3.compression.topk-fraction": 0.25,
        "plan.4.compression.uplink": "int4",
    }

    # Execute
    plain, plain_grid = federate(tiny_model, tmp_path / "plain", BASE)
    rows, grid = federate(tiny_model, tmp_path / "packed", plan)

    # Assert: the default is lossless packed float32
    assert_default_is_packed_float32(plain, plain_grid, load(round_dir(tmp_path / "plain", 0)).global_arrays)
    adapter = load(round_dir(tmp_path / "packed", 0)).global_arrays
    # Assert: sizes are the codec's, per client and round
    shapes = {k: tuple(adapter[k].shape) for k in sent_keys(adapter, False)}
    full = {k: tuple(v.shape) for k, v in adapter.items()}
    for rnd, name, fraction in [(1, "int8", 0.1), (2, "topk", 0.25), (3, "topk", 0.25), (4, "int4", 0.1)]:
        up = encoded_bytes(shapes, Scheme(name, 64, fraction))
        down = encoded_bytes(full, Scheme("int8", 64, fraction))
        assert rows[rnd]["spec"]["compression.uplink"] == name
        assert all(c == {"up": up, "down": 2 * down} for c in rows[rnd]["bytes_per_client"].values())
        assert rows[rnd]["bytes_up"] / plain[rnd]["bytes_up"] < (0.55 if name == "topk" else 0.35)
    # top-k's error feedback is kept per site, keyed by the PEFT keys it trains
    for context in grid.contexts.values():
        assert set(context.state.array_records[RESIDUAL_KEY]) == set(shapes)
    # the compressed federation learns about as well as the float32 one
    assert rows[-1]["eval_loss"] < 0.8 * rows[0]["eval_loss"]
    assert abs(rows[-1]["eval_loss"] / plain[-1]["eval_loss"] - 1) < 0.05
    assert CompressionConfig().uplink == "none"  # the default stays float32


def assert_default_is_packed_float32(rows: list[dict[str, Any]], grid: RecordingGrid, adapter: Arrays) -> None:
    """Under ``compression.* = none`` every train message and reply is one packed float32 array, the
    byte counts are the codec's, and what each site received is the server's adapter bit for bit."""
    shapes = {k: tuple(v.shape) for k, v in adapter.items()}
    for rnd in range(1, len(rows)):
        up = encoded_bytes({k: shapes[k] for k in sent_keys(adapter, False)}, FLOAT32)
        down = 2 * encoded_bytes(shapes, FLOAT32)  # the train and the evaluate message
        assert all(c == {"up": up, "down": down} for c in rows[rnd]["bytes_per_client"].values()), rows[rnd]
    for msg, delta in grid.log:
        assert list(msg.content.array_records[keys.ADAPTER]) == [PACKED]
        assert dict(msg.content.config_records[keys.WIRE])["scheme"] == "float32"
        if msg.metadata.message_type == "train":
            assert delta and all(v.dtype == np.float32 for v in delta.values())
    first = read_arrays(grid.log[0][0].content, keys.ADAPTER)  # round 0's evaluation: the initial adapter
    assert set(first) == set(adapter) and all(first[k].tobytes() == adapter[k].tobytes() for k in adapter)
