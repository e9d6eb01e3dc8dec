"""Work in flight under ``server.mode = async``: one train message per busy site, its replies as they come,
and each site's idle seconds.

Unlike :func:`fedtune.server.exchange.stream_replies`, which pushes one round's messages and waits for
them, sites join at any time here: a site that replies is given new work at once, from the latest global.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message

from fedtune.core.errors import FedtuneError
from fedtune.server.exchange import PULL_INTERVAL, release
from fedtune.server.state import GridLike


@dataclass(frozen=True)
class Work:
    """One train message in flight."""

    node: int
    version: int
    """The global version the site was sent (its start)."""
    sent: float
    """``time.monotonic()`` when it was pushed."""


@dataclass(frozen=True)
class Arrival:
    """A reply (None: no reply within the timeout) to a message in flight."""

    work: Work
    reply: Message | None


class Inflight:
    """The messages in flight on ``grid``, by message id; replies come back one at a time, in arrival order."""

    def __init__(self, grid: GridLike, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        push, pull = getattr(grid, "push_messages", None), getattr(grid, "pull_messages", None)
        if push is None or pull is None:
            raise FedtuneError("`server.mode` = async needs a grid that streams replies (push and pull messages).")
        self._push: Callable[[Iterable[Message]], Iterable[str]] = push
        self._pull: Callable[[Iterable[str]], Iterable[Message]] = pull
        self.timeout = timeout
        self.clock = clock
        self.work: dict[str, Work] = {}
        self.arrived: deque[Arrival] = deque()
        self.free_since: dict[int, float] = {}
        """When each free node became free (who goes next)."""
        self.uncounted: dict[int, float] = {}
        """From when each free node's idle seconds are not yet counted in ``idle``."""
        self.idle: dict[int, float] = {}

    def busy(self) -> set[int]:
        """Nodes with a message in flight (or a reply not yet taken)."""
        return {w.node for w in self.work.values()} | {a.work.node for a in self.arrived}

    def free(self, connected: Iterable[int], exclude: Iterable[int] = ()) -> list[int]:
        """Connected nodes with nothing in flight, longest idle first (new nodes count as idle from now)."""
        now, busy, skip = self.clock(), self.busy(), set(exclude)
        nodes = [n for n in connected if n not in busy and n not in skip]
        for node in nodes:
            self.free_since.setdefault(node, now)
            self.uncounted.setdefault(node, now)
        return sorted(nodes, key=lambda n: (self.free_since[n], n))

    def send(self, message: Message, node: int, version: int) -> None:
        """Push ``message`` to ``node``, which starts from global ``version``; its idle spell ends."""
        now = self.clock()
        self.free_since.pop(node, None)
        if node in self.uncounted:
            self.idle[node] = self.idle.get(node, 0.0) + now - self.uncounted.pop(node)
        (message_id,) = list(self._push([message]))
        self.work[message_id] = Work(node, version, now)

    def next(self) -> Arrival | None:
        """The next reply (or a message past ``server.round-timeout``, with reply None), waiting for it; None
        when nothing is in flight. The node is free (and idle) from then on."""
        while not self.arrived:
            if not self.work:
                return None
            self._collect()
            if not self.arrived:
                time.sleep(PULL_INTERVAL / 5)
        arrival = self.arrived.popleft()
        self.free_since[arrival.work.node] = self.uncounted[arrival.work.node] = self.clock()
        return arrival

    def _collect(self) -> None:
        for reply in self._pull(list(self.work)):
            work = self.work.pop(reply.metadata.reply_to_message_id, None)
            if work is None:  # not ours (or answered twice): only the first answer counts
                release(reply)
                continue
            self.arrived.append(Arrival(work, reply))
        now = self.clock()
        for message_id, work in list(self.work.items()):
            if now - work.sent > self.timeout:
                del self.work[message_id]
                self.arrived.append(Arrival(work, None))

    def idle_seconds(self, connected: Iterable[int]) -> dict[int, float]:
        """Each connected node's idle seconds since the last call (a node still idle is counted up to now)."""
        now = self.clock()
        for node in connected:
            if node in self.uncounted:
                self.idle[node] = self.idle.get(node, 0.0) + now - self.uncounted[node]
                self.uncounted[node] = now
            else:
                self.idle.setdefault(node, 0.0)
        out, self.idle = {n: round(s, 3) for n, s in sorted(self.idle.items())}, {}
        return out

    def drop(self) -> int:
        """Forget the work in flight (the run ended): its replies are never read. How many were dropped."""
        count = len(self.work) + len(self.arrived)
        for arrival in self.arrived:
            if arrival.reply is not None:
                release(arrival.reply)
        self.work.clear()
        self.arrived.clear()
        return count
