"""Who took part in a round, and keeping it out of outputs and logs when the client sample is secret
(``privacy.rounds.participants_hidden``: amplification by client sampling is claimed)."""

from __future__ import annotations

import re
from collections.abc import Collection

from fedtune.server.record import Failure, RoundRecord


def who(node: int, hide: Collection[int] | None) -> str:
    """How the log names ``node``: by id, or not at all when ``hide`` holds the round's secret sample."""
    return f"node {node}" if hide is None else "a sampled node"


def scrub(text: str, hide: Collection[int] | None) -> str:
    """``text`` with each node id in ``hide`` replaced by ``<node>`` (as a whole number)."""
    if not hide:
        return text
    ids = "|".join(sorted((str(n) for n in hide), key=len, reverse=True))
    return re.sub(rf"(?<![\w.])(?:{ids})(?!\w|\.\d)", "<node>", text)


def redact(record: RoundRecord, sampled: Collection[int]) -> None:
    """Take who took part out of a round's ``record`` (the sample is secret): the id lists and per-node
    fields go, failures keep their reasons with every sampled id replaced, SecAgg+ keeps its counts."""
    record.sampled_nodes = record.replied_nodes = record.budget_exhausted_nodes = None
    record.bytes_per_client = None
    record.data_checks = None
    if record.failures is not None:
        record.failures = [Failure(None, scrub(f.reason, sampled)) for f in record.failures]
    if (secure := record.secagg) is not None:
        secure.dropped = secure.recovered = None
        if secure.abandoned is not None:
            secure.abandoned = scrub(secure.abandoned, sampled)
