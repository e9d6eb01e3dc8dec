"""LoRA-SB's frame (its fixed A and B) goes down to each site once, not with every adapter.

Every LoRA-SB adapter the server sends names the frame's fingerprint (``model.sb.fingerprint``, in the
index's ``frame`` entry); the frame itself goes only to a node not known to hold it, so after a
site's first message the downlink is the r x r cores. ``ServerState.frame_holders`` maps each node to
the fingerprint it was last sent. A node counts as holding the frame once it is sent it, and is
forgotten as soon as it answers any message with an error or does not answer: a site that lacks the
frame (a restarted site, a lost message) refuses its round with one line, and gets the frame the next
time. The map is not checkpointed, so after a server resume every site gets the frame again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping

from flwr.app import Message

from fedtune.core.arrays import Arrays
from fedtune.model.sb import fingerprint, frame_of, is_sb

Holders = MutableMapping[int, str]
"""Node id -> fingerprint of the frame it was last sent."""


def frame_fingerprint(arrays: Arrays) -> str | None:
    """The fingerprint of a LoRA-SB adapter's frame; None for any other adapter (nothing is held back)."""
    return fingerprint(frame_of(arrays)) if is_sb(arrays) else None


def holds(holders: Holders, node: int, frame: str | None) -> bool:
    """Whether ``node`` is known to hold the frame ``frame``, so that its adapter can go without it."""
    return frame is not None and holders.get(node) == frame


def note_sent(holders: Holders, node: int, frame: str | None) -> None:
    """``node`` is sent the frame ``frame`` (it holds it from now on, unless it fails)."""
    if frame is not None:
        holders[node] = frame


def forget(holders: Holders, nodes: Iterable[int]) -> None:
    """``nodes`` may not hold the frame (they failed or did not answer): their next adapter carries it."""
    for node in nodes:
        holders.pop(node, None)


def watch(
    replies: Iterable[tuple[int, Message]], nodes: Iterable[int], holders: Holders
) -> Iterator[tuple[int, Message]]:
    """``replies`` (node, reply) passed through unchanged; a node that answers with an error, or has not
    answered when the stream ends or is dropped, is forgotten."""
    waiting = set(nodes)
    try:
        for node, reply in replies:
            waiting.discard(node)
            if reply.has_error():
                forget(holders, [node])
            yield node, reply
    finally:
        forget(holders, waiting)
