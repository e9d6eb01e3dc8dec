"""Who took part in a round, and keeping it out of outputs and logs when the client sample is secret
(``privacy.rounds.participants_hidden``: amplification by client sampling is claimed)."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

PARTICIPANT_FIELDS = ("sampled_nodes", "replied_nodes", "budget_exhausted_nodes", "bytes_per_client", "data_checks")
"""Row fields that name, or are keyed by, the nodes that took part in the round's training."""


def who(node: int, hide: Collection[int] | None) -> str:
    """How the log names ``node``: by id, or not at all when ``hide`` holds the round's secret sample."""
    return f"node {node}" if hide is None else "a sampled node"


def scrub(text: str, hide: Collection[int] | None) -> str:
    """``text`` with each node id in ``hide`` replaced by ``<node>`` (as a whole number)."""
    if not hide:
        return text
    ids = "|".join(sorted((str(n) for n in hide), key=len, reverse=True))
    return re.sub(rf"(?<![\w.])(?:{ids})(?!\w|\.\d)", "<node>", text)


def redact(row: dict[str, Any], sampled: Collection[int]) -> None:
    """Take who took part out of a round's ``row`` (the sample is secret): the id lists and per-node
    fields go, failures keep their reasons with every sampled id replaced, SecAgg+ keeps its counts."""
    for key in PARTICIPANT_FIELDS:
        row.pop(key, None)
    if "failures" in row:
        row["failures"] = [{"reason": scrub(str(f.get("reason", "")), sampled)} for f in row["failures"]]
    if isinstance(secure := row.get("secagg"), dict):
        for key in ("dropped", "recovered"):
            secure.pop(key, None)
        if "abandoned" in secure:
            secure["abandoned"] = scrub(str(secure["abandoned"]), sampled)
