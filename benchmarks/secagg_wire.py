"""The benchmark's transport: fedtune's in-process ``shared`` grid, with every message serialized.

Each message to a client and each reply goes through Flower's own protobuf serde
(``message_to_proto(...).SerializeToString()`` and back), as it would between a SuperLink and a
SuperNode, so the byte counts are real wire sizes and the round time includes (de)serialization.
Both fedtune's round loop and Flower's legacy workflows run on it, one client after another.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from types import SimpleNamespace
from uuid import uuid4

from flwr.app import Message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedtune.simulations.local import ClientCallable, LocalGrid


def _wire(msg: Message) -> tuple[Message, int]:
    blob = message_to_proto(msg).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(blob)), len(blob)


class WireGrid(LocalGrid):
    """``LocalGrid`` that serializes each message both ways and counts bytes per round (group id)."""

    run = SimpleNamespace(run_id=1)  # Flower's legacy client manager reads grid.run.run_id

    def __init__(self, client_app: ClientCallable, num_sites: int) -> None:
        super().__init__(client_app, num_sites)
        self.down: dict[str, int] = defaultdict(int)
        self.up: dict[str, int] = defaultdict(int)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as push_messages does
            out.append(self._handle(msg))
        return out

    def _handle(self, msg: Message) -> Message:
        group = msg.metadata.group_id
        received, size = _wire(msg)
        self.down[group] += size
        reply, size = _wire(super()._handle(received))
        self.up[group] += size
        return reply
