"""The local channel between a site's short-lived ClientApp and its long-lived site worker.

One unary gRPC method over a Unix domain socket in a private directory (mode 0700, the socket
0600), with a per-site random token in a 0600 file beside the socket: only a process of the same
user that can read that directory can call the worker, and the worker checks the token (in constant
time) before it parses anything. The request is the round's Message and the ClientApp's Context, the
reply is the reply Message and the Context after the handler, both in Flower's own protobuf serde,
so the worker runs exactly the handlers the ClientApp would.

This module is imported by the ClientApp edge in every message's process: it must stay light
(grpc and Flower's serde, no torch).
"""

from __future__ import annotations

import os
import secrets
import stat
import struct
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedtune.core.errors import FedtuneError

SOCKET_NAME = "worker.sock"
TOKEN_NAME = "token"
METHOD = "/fedtune.SiteWorker/Handle"
TOKEN_HEADER = "x-fedtune-worker-token"
# An adapter of a large model is far above gRPC's 4 MiB default; the peer is local and trusted.
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_LENGTH = struct.Struct("!Q")


def pack(message: Message, context: Context) -> bytes:
    """A Message and a Context as one byte string (length-prefixed protobufs)."""
    head: bytes = message_to_proto(message).SerializeToString()
    tail: bytes = context_to_proto(context).SerializeToString()
    return _LENGTH.pack(len(head)) + head + tail


def unpack(data: bytes) -> tuple[Message, Context]:
    """The inverse of :func:`pack`."""
    (size,) = _LENGTH.unpack_from(data)
    start = _LENGTH.size
    message, context = ProtoMessage(), ProtoContext()
    message.ParseFromString(data[start : start + size])
    context.ParseFromString(data[start + size :])
    return message_from_proto(message), context_from_proto(context)


def socket_path(directory: Path) -> Path:
    """The worker's socket inside its private directory."""
    return directory / SOCKET_NAME


def token_path(socket: Path) -> Path:
    """The token file beside a worker's socket."""
    return socket.parent / TOKEN_NAME


def new_private_dir(parent: Path | None = None) -> Path:
    """A fresh directory only this user can enter (0700), holding a random token file (0600)."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="fedtune-worker-", dir=parent))  # mkdtemp: mode 0700
    fd = os.open(token_path(socket_path(directory)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return directory


def check_private_dir(directory: Path) -> None:
    """Refuse a directory other users could enter or that another user owns."""
    try:
        info = directory.stat()
    except OSError as exc:
        raise FedtuneError(f"`--dir`: cannot use {directory}: {exc.strerror}.") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise FedtuneError(f"`--dir`: {directory} must be a directory of this user with mode 0700.")


def read_token(socket: Path) -> str:
    """The token beside ``socket`` (raises OSError when it cannot be read)."""
    return token_path(socket).read_text().strip()
