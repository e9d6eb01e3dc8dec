"""Moving messages: wait for sites, push a round's messages and stream the replies back, drop payloads."""

from __future__ import annotations

import time
from collections.abc import Iterator

from flwr.app import Message

from fedtune.core.errors import FedtuneError
from fedtune.server.state import GridLike

PULL_INTERVAL = 0.5  # seconds between polls for replies (Flower's HttpGrid waits 3 s)


def wait_for_nodes(grid: GridLike, count: int, timeout: float) -> list[int]:
    """Connected node ids once at least ``count`` are there; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() >= deadline:
            raise FedtuneError(
                f"only {len(nodes)} of `server.min-clients` = {count} clients connected "
                f"within `server.wait-for-clients` = {timeout:.0f} s."
            )
        time.sleep(1.0)


def stream_replies(grid: GridLike, messages: list[Message], timeout: float) -> Iterator[tuple[int, Message]]:
    """Push ``messages`` and yield (node id, reply) as replies arrive, so the caller can fold each
    one into its aggregate and drop it: server memory then does not grow with the number of clients.

    The node is the one the original message went to: Flower answers for an unreachable node with
    an error reply from the SuperLink itself, whose source is not that node.
    """
    push, pull = getattr(grid, "push_messages", None), getattr(grid, "pull_messages", None)
    if push is None or pull is None:  # a grid that only offers the batch call
        for reply in grid.send_and_receive(messages, timeout=timeout):
            yield int(reply.metadata.src_node_id), reply
        return
    destinations = [m.metadata.dst_node_id for m in messages]
    ids = list(push(messages))
    node_of = dict(zip(ids, destinations, strict=True))
    pending = set(ids)
    del messages
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        arrived = list(pull(pending))
        for reply in arrived:
            origin = reply.metadata.reply_to_message_id
            pending.discard(origin)
            yield int(node_of.get(origin, reply.metadata.src_node_id)), reply
        if pending and not arrived:
            time.sleep(PULL_INTERVAL)


def release(reply: Message) -> None:
    """Drop a reply's arrays now: Flower's message objects sit in reference cycles, so without
    this their payload waits for the cyclic garbage collector (about 15 replies here)."""
    if reply.has_error() or not reply.has_content():
        return
    for record in reply.content.array_records.values():
        for key in list(record.keys()):
            del record[key]
