"""The server's last message of a run: every connected site is told that the run finished.

A SuperNode serves until it is stopped and hears nothing when a run ends; this one query message
(``query.run_finished``, no payload) lets ``fedtune client`` log one line with Flower's run id. Sites
that do not answer within :data:`TIMEOUT` seconds are not waited for: the run is already complete.
"""

from __future__ import annotations

import contextlib
import logging

from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.server.state import GridLike
from fedtune.wire import keys

log = logging.getLogger(__name__)

TIMEOUT = 15.0  # seconds: a SuperNode pulls every 3 s, and the reply needs no model


def announce(grid: GridLike, rounds: int) -> None:
    """Send ``query.run_finished`` to every connected site and wait briefly for the answers."""
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({keys.SPEC: ConfigRecord({keys.ROUNDS_DONE: rounds})})
    messages = [Message(content, dst_node_id=n, message_type=f"query.{keys.RUN_FINISHED}") for n in nodes]
    with contextlib.suppress(Exception):  # a site that has gone away changes nothing now
        replies = list(grid.send_and_receive(messages, timeout=TIMEOUT))
        log.info("Told %d of %d connected site(s) that the run finished", len(replies), len(nodes))
