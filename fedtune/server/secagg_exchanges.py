"""SecAgg+'s message exchanges with the sampled clients: send one stage, keep what answered in time,
tally failures, bytes and seconds; and the checks every stage's replies share.

``server/secagg_round.py`` runs the four stages through :class:`Exchanges`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flwr.app import Message, RecordDict

from fedtune.privacy.secagg.errors import SecAggError, TooFewSurvivors
from fedtune.server.exchange import release, stream_replies
from fedtune.server.participants import scrub, who
from fedtune.server.state import GridLike
from fedtune.server.validation import refused
from fedtune.wire import keys
from fedtune.wire.codec import index_bytes
from fedtune.wire.records import payload_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")


def _payload(content: RecordDict) -> int:
    """Bytes of array data (with a packed adapter's index) and of byte strings (keys, ciphertexts,
    shares) a message carries."""
    total = sum(payload_bytes(r) for r in content.array_records.values())
    if keys.WIRE in content.config_records:
        total += index_bytes(content.config_records[keys.WIRE])
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


@dataclass
class Exchanges:
    """Sends each stage's messages, keeps what answered, and tallies failures, bytes and seconds."""

    grid: GridLike
    rnd: int
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    hide: Collection[int] | None = None
    """The round's sample when it is secret: the log then names no node (``loop.who``, ``loop.scrub``)."""

    def run(
        self,
        stage: str,
        kind: str,
        contents: Mapping[int, RecordDict],
        timeout: float,
        handle: Callable[[int, Message], T | None],
    ) -> dict[int, T]:
        """Each node's ``handle``d reply; a node that errs, answers badly or not in time is a failure, one
        whose ``handle`` returns None simply leaves (a dp-sgd site out of budget). ``handle`` must leave
        the round's state untouched when it raises: anything it raises fails that node, never the round."""
        start = time.monotonic()
        messages = [Message(c, dst_node_id=n, message_type=kind, group_id=str(self.rnd)) for n, c in contents.items()]
        down, up, out, answered = sum(_payload(c) for c in contents.values()), 0, {}, set()
        for node, reply in stream_replies(self.grid, messages, timeout):
            if node not in contents or node in answered:
                continue  # not asked this stage, or a second answer
            answered.add(node)
            try:
                if reply.has_error():
                    raise SecAggError(f"client error: {reply.error.reason}")
                up += _payload(reply.content)
                value = handle(node, reply)
                if value is not None:
                    out[node] = value
            except Exception as exc:  # a reply is untrusted input: whatever its handling raises fails its node only
                self.fail(node, stage, refused(exc))
            finally:
                release(reply)
        for node in sorted(set(contents) - answered):
            self.fail(node, stage, f"no reply within {timeout:g} s")
        n_down, n_up = max(len(contents), 1), max(len(answered), 1)
        self.stages[stage] = {
            "seconds": time.monotonic() - start,
            "clients": len(contents),
            "answered": len(out),
            "bytes_down": down,
            "bytes_up": up,
            "bytes_down_per_client": down / n_down,
            "bytes_up_per_client": up / n_up,
        }
        return out

    def fail(self, node: int, stage: str, reason: str) -> None:
        shown = scrub(reason, self.hide)
        log.warning("round %d: secagg stage %s: %s failed: %s", self.rnd, stage, who(node, self.hide), shown)
        self.failures.setdefault(node, f"secagg {stage}: {reason}")


def owned(
    record: Mapping[str, Any],
    owners_key: str,
    values_key: str,
    exactly: frozenset[int] | None = None,
    within: Collection[int] | None = None,
) -> dict[int, bytes]:
    """{owner: bytes} from two parallel lists of distinct integer owners and byte strings; ``exactly``: the
    owners that must appear, once each; ``within``: the owners that may."""
    owners, values = record[owners_key], record[values_key]
    if not (isinstance(owners, list) and isinstance(values, list) and len(owners) == len(values)):
        raise SecAggError(f"'{owners_key}' and '{values_key}' must be lists of equal length")
    if not all(isinstance(o, int) and not isinstance(o, bool) for o in owners) or len(set(owners)) != len(owners):
        raise SecAggError(f"'{owners_key}' must be distinct integer node ids")
    if not all(isinstance(v, bytes) for v in values):
        raise SecAggError(f"'{values_key}' must be byte strings")
    out = dict(zip(owners, values, strict=True))
    if exactly is not None and set(out) != exactly:
        raise SecAggError(f"'{owners_key}' must be exactly the neighbours {sorted(exactly)}, got {sorted(out)}")
    if within is not None and not set(out) <= set(within):
        raise SecAggError(f"'{owners_key}' names nodes it was not asked about: {sorted(set(out) - set(within))}")
    return out


def enough(who: list[int], needed: int, did: str) -> None:
    if len(who) < max(needed, 2):
        raise TooFewSurvivors(f"only {len(who)} client(s) {did}; the round needs at least {max(needed, 2)}.")


def kind_of(category: str, action: str) -> str:
    return f"{category}.{action}"
