"""Where a round's time goes: the sites' own load / train / serialize seconds (from their replies),
transport (each reply's round trip minus what its site reported), the server's parts, and each site's
idle seconds.

Under a DP mechanism sites send no seconds (they follow the data: Poisson batch sizes, token counts),
so the breakdown holds each reply's whole ``round_trip`` instead of the four site-side parts."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from fedtune.wire import keys

CLIENT_PARTS = {"load": keys.TIME_LOAD, "train": keys.TIME_TRAIN, "serialize": keys.TIME_SERIALIZE}


class RoundClock:
    """Accumulates one round's time breakdown for ``metrics.jsonl`` (``time``).

    Client parts are summed over the round's replies (client-seconds). A reply's round trip starts
    when the messages are pushed or, on an in-process grid (sites run one after another inside the
    pull), when the loop asked for the next reply; so ``transport`` also holds any time a message
    waited for a free simulation worker.
    """

    def __init__(self, *, sequential: bool, site_seconds: bool = True) -> None:
        self.sequential = sequential
        self.site_seconds = site_seconds
        """Whether replies carry their sites' own seconds (never under DP)."""
        site = dict.fromkeys(["load", "train", "serialize", "transport"] if site_seconds else ["round_trip"], 0.0)
        self.parts: dict[str, float] = {
            **site,
            "server_serialize": 0.0,
            "aggregate": 0.0,
            "eval": 0.0,
        }
        self.pushed = self.resumed = time.perf_counter()

    def push(self, serialize_seconds: float) -> None:
        """The messages are built (``serialize_seconds``) and about to be pushed."""
        self.parts["server_serialize"] += serialize_seconds
        self.pushed = self.resumed = time.perf_counter()

    def arrived(self, metrics: Mapping[str, Any]) -> None:
        """A reply arrived now; take its site's own seconds out of its round trip (a value that is not a
        finite number >= 0 is the reply's mistake, not a time: it is left out)."""
        trip = time.perf_counter() - (self.resumed if self.sequential else self.pushed)
        if not self.site_seconds:  # a site's seconds under DP are ignored, even if it sent some
            self.parts["round_trip"] += trip
            return
        own = 0.0
        for part, key in CLIENT_PARTS.items():
            value = metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf:
                self.parts[part] += float(value)
                own += float(value)
        self.parts["transport"] += max(trip - own, 0.0)

    def resume(self) -> None:
        """The loop is done with the last reply and waits for the next."""
        self.resumed = time.perf_counter()

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] += seconds


def waited_for_slowest(replied: Mapping[int, float], end: float) -> dict[int, float]:
    """A synchronous round's idle seconds per replied site: from its reply (``replied[node]``, a clock reading)
    until the round's end ``end`` (the slowest reply, or the round timeout when a site never answered), to
    the millisecond, as ``server.mode = async`` records its own (``metrics.jsonl``'s ``idle_seconds``)."""
    return {node: round(max(end - at, 0.0), 3) for node, at in sorted(replied.items())}
