"""The site worker: a long-lived process at a data site that runs the ClientApp's handlers.

Flower's deployment engine starts a fresh ``flwr-clientapp`` process for every message, which would
re-import torch and reload the base model every round. ``fedtune client`` therefore starts this
worker beside the SuperNode; the ClientApp (``fedtune.client.edge``) only hands each message and its
Context over the private channel of :mod:`fedtune.deploy.channel`. The worker calls the very same
ClientApp (``fedtune.client.app:app``) in-process, one message at a time, so the base model (on the
GPU where there is one), the tokenized data and anything else the handlers keep in the process stay
resident; what Flower keeps per site (``context.state``) travels with each call and comes back.

Run as ``python -m fedtune.deploy.worker --dir DIR``, where DIR is a private directory (0700)
holding the token file; the worker listens on ``DIR/worker.sock`` (0600).
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client import channel
from fedtune.core.errors import FedtuneError

log = logging.getLogger("fedtune.deploy.worker")  # also when run as __main__

ClientCallable = Callable[[Message, Context], Message]


def _default_app() -> ClientCallable:
    from fedtune.client.app import app

    return app


class SiteWorker:
    """Answers the channel's one method: check the token, run the ClientApp, return its reply."""

    def __init__(self, token: str, load_app: Callable[[], ClientCallable] = _default_app) -> None:
        self._token = token.encode()
        self._load_app = load_app
        self._lock = threading.Lock()  # one message at a time: the site's model is shared

    def authorized(self, context: grpc.ServicerContext) -> bool:
        """Whether the caller presented this site's token (compared in constant time)."""
        sent = dict(context.invocation_metadata()).get(channel.TOKEN_HEADER, "")
        return hmac.compare_digest(str(sent).encode(), self._token)

    def handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The gRPC method: refuse a wrong token before parsing anything, else run the message."""
        if not self.authorized(context):
            log.warning("site worker: refused a call without this site's token (peer %s)", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing site worker token")
        with self._lock:
            start = time.perf_counter()
            message, ctx = channel.unpack(request)
            decoded = time.perf_counter()
            reply = self.run(message, ctx)
            ran = time.perf_counter()
            data = channel.pack(reply, ctx)
            log.info(
                "site worker: %s (round %s) in %.2f s: decode %.3f s, handler %.2f s, encode %.3f s",
                *(message.metadata.message_type, message.metadata.group_id or "-", time.perf_counter() - start),
                *(decoded - start, ran - decoded, time.perf_counter() - ran),
            )
            return data

    def run(self, message: Message, context: Context) -> Message:
        """Call the ClientApp as Flower's ``flwr-clientapp`` does; an exception becomes an Error reply."""
        TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id
        TaskIdentity.task_id = message.metadata.dst_task_id or 0
        try:
            return self._load_app()(message, context)
        except Exception as exc:  # a crashing handler must not take the site's worker down
            log.exception("site worker: the ClientApp raised")
            reason = f"{type(exc).__name__}: {exc}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def start_server(directory: Path, worker: SiteWorker) -> grpc.Server:
    """Listen on ``directory``'s socket (created 0600) and serve ``worker``."""
    socket = channel.socket_path(directory)
    socket.unlink(missing_ok=True)
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=channel.OPTIONS)
    method = grpc.unary_unary_rpc_method_handler(worker.handle)  # raw bytes in and out
    service, name = channel.METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {name: method})])
    old = os.umask(0o177)  # the socket is created 0600, with no window where it is wider
    try:
        server.add_insecure_port(f"unix:{socket}")
    finally:
        os.umask(old)
    server.start()
    return server


def serve(directory: Path) -> None:
    """Run the worker until SIGTERM/SIGINT or until the process that started it is gone."""
    channel.check_private_dir(directory)
    try:
        token = channel.read_token(channel.socket_path(directory))
    except OSError as exc:
        raise FedtuneError(f"`--dir`: cannot read the token in {directory}: {exc.strerror}.") from None
    worker = SiteWorker(token)
    server = start_server(directory, worker)
    log.info("site worker %d listening on %s", os.getpid(), channel.socket_path(directory))
    # Import the handlers (torch, transformers, peft) now, not when the first message arrives.
    threading.Thread(target=_default_app, daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    while not stop.wait(0.5):
        if os.getppid() != parent:  # `fedtune client` died without stopping us
            log.warning("site worker: the process that started it is gone; stopping")
            break
    server.stop(grace=2).wait()
    channel.socket_path(directory).unlink(missing_ok=True)
    ranks = sys.modules.get("fedtune.client.ranks")  # imported by a data-parallel round
    if ranks is not None:
        ranks.shutdown()  # the site's resident data-parallel ranks end with the worker


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fedtune.deploy.worker``."""
    from fedtune.core.logs import setup_logging

    parser = argparse.ArgumentParser(prog="fedtune-site-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="private directory (0700) holding the token file")
    args = parser.parse_args(argv)
    setup_logging()  # the handlers' module quiets the libraries when it is imported
    try:
        serve(Path(args.dir))
    except FedtuneError as exc:
        print(f"fedtune site worker: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
