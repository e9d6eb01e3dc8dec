"""A malformed global adapter at the site (the downlink's counterpart of ``test_reply_fuzz.py``): whatever
the server's message carries in place of the packed adapter, the real ClientApp answers with one error
line saying the global adapter is malformed, logs that line once, and raises nothing."""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune.client.app import app as client_app
from fedtune.config import RunConfig
from fedtune.model.adapters import adapter_arrays, init_adapter, wrap_lora
from fedtune.model.loading import load_base
from fedtune.server.send import round_content
from fedtune.wire import keys
from fedtune.wire.codec import PACKED
from fedtune.wire.records import float32_records, record_from_arrays

DEMO = Path(__file__).resolve().parents[2] / "fedtune" / "data" / "demo" / "train.jsonl"
Content = dict[str, Any]


def _packed(content: Content) -> np.ndarray:
    buf = io.BytesIO(content[keys.ADAPTER][PACKED].data)
    np.lib.format.read_magic(buf)
    np.lib.format.read_array_header_1_0(buf)
    return np.frombuffer(buf.read(), np.uint8).copy()


def _set_packed(content: Content, packed: np.ndarray) -> None:
    content[keys.ADAPTER] = ArrayRecord(OrderedDict([(PACKED, Array(packed))]))


def _set_index(content: Content, **changes: Any) -> None:
    content[keys.WIRE] = ConfigRecord({**dict(content[keys.WIRE].items()), **changes})


def _nan(content: Content, arrays: dict[str, np.ndarray]) -> None:
    packed = _packed(content)
    packed[:4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    _set_packed(content, packed)


def _transposed(content: Content, arrays: dict[str, np.ndarray]) -> None:  # same byte count, wrong shapes
    first = next(iter(arrays))
    content.update(float32_records({**arrays, first: arrays[first].T.copy()}, keys.ADAPTER))


def _missing(content: Content, arrays: dict[str, np.ndarray]) -> None:
    content.update(float32_records(dict(list(arrays.items())[1:]), keys.ADAPTER))


def _unknown(content: Content, arrays: dict[str, np.ndarray]) -> None:
    content.update(float32_records({**arrays, "not.in.the.model": np.zeros(3, np.float32)}, keys.ADAPTER))


def _one_dimensional(content: Content, arrays: dict[str, np.ndarray]) -> None:
    content.update(float32_records({k: v.reshape(-1) for k, v in arrays.items()}, keys.ADAPTER))


MUTATIONS: dict[str, Callable[[Content, dict[str, np.ndarray]], None]] = {
    "truncated": lambda c, a: _set_packed(c, _packed(c)[:-5]),
    "not npy": lambda c, a: c.update({keys.ADAPTER: ArrayRecord({PACKED: Array("uint8", (9,), "numpy", b"garbage")})}),
    "no index": lambda c, a: c.pop(keys.WIRE),
    "no adapter": lambda c, a: c.pop(keys.ADAPTER),
    "per-key arrays": lambda c, a: c.update({keys.ADAPTER: record_from_arrays(a)}),
    "another scheme": lambda c, a: _set_index(c, scheme="int8"),
    "index dims": lambda c, a: _set_index(c, dims=["x"]),
    "non-finite value": _nan,
    "wrong shapes": _transposed,
    "missing array": _missing,
    "unknown array": _unknown,
    "one-dimensional arrays": _one_dimensional,
}


@pytest.fixture(scope="module")
def honest(tiny_model: Path) -> tuple[RunConfig, dict[str, np.ndarray]]:
    """The round's config and the global adapter of the tiny model, as the server has it."""
    cfg = RunConfig.from_flat({"model.name": str(tiny_model), "data.path": str(DEMO)})
    model = wrap_lora(load_base(cfg.model, torch.device("cpu")), cfg.lora)
    init_adapter(model, cfg.seed)
    return cfg, adapter_arrays(model)


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_malformed_global_adapter_is_one_error_line_at_the_site(
    name: str, kind: str, honest: tuple[RunConfig, dict[str, np.ndarray]], task_identity: None, caplog: Any
) -> None:
    # Prepare: the server's message for round 1, then the mutation
    cfg, arrays = honest
    content: Content = dict(round_content(arrays, cfg, 1).items())
    MUTATIONS[name](content, arrays)
    msg = Message(RecordDict(content), dst_node_id=1, message_type=kind, group_id="1")
    node = {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 5}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    # Execute
    with caplog.at_level(logging.ERROR, logger="fedtune"):
        reply = client_app(msg, context)

    # Assert: an error reply of one line, logged once, naming the global adapter
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith("the global adapter from the server is malformed: "), reason
    assert "\n" not in reason and "Traceback" not in reason
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [reason]


def test_the_honest_message_trains(honest: tuple[RunConfig, dict[str, np.ndarray]], task_identity: None) -> None:
    # Prepare: the same message, unchanged (the mutations above are what makes them fail)
    cfg, arrays = honest
    msg = Message(round_content(arrays, cfg, 1), dst_node_id=1, message_type=MessageType.EVALUATE, group_id="1")
    node = {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 5}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    # Execute
    reply = client_app(msg, context)

    # Assert
    assert not reply.has_error(), reply.error.reason
    assert reply.content.metric_records[keys.METRICS][keys.EVAL_LOSS] > 0
