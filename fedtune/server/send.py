"""Sending the global adapter: a round's content as clients receive it, and the send that counts each
node's bytes and streams the replies back."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.server import frame, traffic
from fedtune.server.exchange import stream_replies
from fedtune.server.record import RoundRecord
from fedtune.server.state import GridLike, ServerState
from fedtune.server.timing import RoundClock
from fedtune.wire import keys
from fedtune.wire.codec import Scheme, rng_for
from fedtune.wire.records import encode, message_bytes


def round_content(arrays: Arrays, cfg: RunConfig, rnd: int, extra: Mapping[str, int | str] | None = None) -> RecordDict:
    """The global adapter (packed, ``compression.downlink``) plus the round's flat spec (and ``extra``
    entries), as clients receive them."""
    spec = ConfigRecord({**cfg.to_flat(), keys.ROUND: rnd, **(extra or {})})
    scheme = Scheme.of(cfg.compression, "downlink")
    records, _ = encode(arrays, keys.ADAPTER, scheme, rng_for(cfg.seed, rnd, "server"))
    return RecordDict({**records, keys.SPEC: spec})


def send_adapter(
    grid: GridLike,
    state: ServerState,
    cfg: RunConfig,
    nodes: list[int],
    kind: str,
    rnd: int,
    record: RoundRecord,
    clock: RoundClock | None = None,
    extra: Mapping[str, int | str] | None = None,
) -> Iterator[tuple[int, Message]]:
    """Send each node the global adapter at its own rank (once known; full rank when quantized; under
    LoRA-SB the frame only to a node that lacks it) with the round's spec, count each node's bytes in
    ``record``; return the replies as a stream."""
    started = time.perf_counter()
    if nodes:  # the server steps and evaluates from exactly what the sites receive
        state.global_arrays = traffic.received_adapter(cfg, state, rnd)
    spec = ConfigRecord({**cfg.to_flat(), keys.ROUND: rnd, keys.RUN_ID: state.run_id, **(extra or {})})
    downlink = traffic.Downlink(cfg, state, rnd)
    contents: dict[int, RecordDict] = {}  # by records object: nodes of the same rank and frame status share one
    messages = []
    for node in nodes:
        records = downlink.records(node)
        if id(records) not in contents:
            contents[id(records)] = RecordDict({**records, keys.SPEC: spec})
        content = contents[id(records)]
        record.count_bytes(node, down=message_bytes(content, keys.ADAPTER))
        messages.append(Message(content, dst_node_id=node, message_type=kind, group_id=str(rnd)))
    if clock is not None:
        clock.push(time.perf_counter() - started)
    return frame.watch(stream_replies(grid, messages, cfg.server.round_timeout), nodes, state.frame_holders)
