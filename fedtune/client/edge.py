"""The ClientApp that deployments run: forwards each message to the site worker when there is one.

Flower starts a fresh process for every message in a deployment. This module is what that process
loads, so it imports only Flower and grpc (about 0.5 s), never torch. When the node config names a
site worker (``worker`` = its socket, set by ``fedtune client``), the message and the Context go to
the worker, which runs the real handlers (``fedtune.client.app``) on its resident model, and the
worker's reply and updated ``context.state`` come back. Without a worker (``fedtune client
--no-worker``, simulations) the handlers run here, in this process, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client import channel
from fedtune.wire import keys

log = logging.getLogger(__name__)

ERROR_CODE = 3  # Flower's Error.code for "the site worker could not be reached or did not answer"
DEFAULT_TIMEOUT = 600.0  # seconds, when the round spec carries no `server.round-timeout`
ROUND_TIMEOUT_KEY = "server.round-timeout"

app = ClientApp()


# SecAgg+ stages that need no model, data or torch (message type -> handler in fedtune.client.secagg):
# without a site worker they run here directly, never importing the training stack (fedtune.client.app),
# so each answers in well under a second.
MODEL_FREE_STAGES = {f"query.{keys.SECAGG_SHARE}": "share_keys", f"query.{keys.SECAGG_UNMASK}": "unmask"}


def handle(msg: Message, context: Context) -> Message:
    """Forward to the site worker named in the node config, else run the handlers in-process."""
    address = context.node_config.get(keys.WORKER)
    if address:
        return forward(msg, context, Path(str(address)))
    stage = MODEL_FREE_STAGES.get(msg.metadata.message_type)
    if stage is not None:
        from fedtune.client import secagg

        reply: Message = getattr(secagg, stage)(msg, context)
        return reply
    from fedtune.client.app import app as local

    return local(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train at the site (see :func:`handle`)."""
    return handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate at the site (see :func:`handle`)."""
    return handle(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer a query at the site (see :func:`handle`)."""
    return handle(msg, context)


@app.query(keys.RUN_FINISHED)
def run_finished(msg: Message, context: Context) -> Message:
    """The server's last message of a run: one line for the site's log (Flower's run id), here in
    this process, never forwarded."""
    spec: Mapping[str, Any] = msg.content.config_records.get(keys.SPEC, {}) if msg.has_content() else {}
    rounds = spec.get(keys.ROUNDS_DONE, "?")
    print(f"fedtune client: run {context.run_id} finished ({rounds} rounds); serving until stopped", flush=True)
    return Message(RecordDict(), reply_to=msg)


# SecAgg+ stages (fedtune.client.secagg) travel as actions of their own; route them the same way.
for _action in (keys.SECAGG_KEYS, keys.SECAGG_SHARE, keys.SECAGG_UNMASK):
    app.query(_action)(handle)
app.train(keys.SECAGG_TRAIN)(handle)


def reply_timeout(msg: Message) -> float:
    """How long to wait for the worker: the server stops waiting after `server.round-timeout`."""
    spec: Mapping[str, Any] = msg.content.config_records.get(keys.SPEC, {}) if msg.has_content() else {}
    value = spec.get(ROUND_TIMEOUT_KEY, DEFAULT_TIMEOUT)
    return float(value) if isinstance(value, int | float) and value > 0 else DEFAULT_TIMEOUT


def forward(msg: Message, context: Context, socket: Path) -> Message:
    """Send ``msg`` and ``context`` to the worker at ``socket``; return its reply and take over its
    ``context.state``. Any failure is an Error reply whose reason names the socket, never a hang."""
    timeout = reply_timeout(msg)
    try:
        token = channel.read_token(socket)
    except OSError as exc:
        return _refuse(msg, f"cannot read the site worker's token {channel.token_path(socket)}: {exc.strerror}")
    try:
        with grpc.insecure_channel(f"unix:{socket}", options=channel.OPTIONS) as chan:
            call = chan.unary_unary(channel.METHOD)
            data = call(
                channel.pack(msg, context),
                timeout=timeout,
                metadata=[(channel.TOKEN_HEADER, token)],
                wait_for_ready=False,  # fail at once when nothing listens there
            )
    except grpc.RpcError as exc:
        return _refuse(msg, _explain(exc, socket, timeout))
    reply, after = channel.unpack(data)
    context.state = after.state
    return reply


def _explain(exc: grpc.RpcError, socket: Path, timeout: float) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    first = details.strip().splitlines()[0] if details.strip() else ""
    if code == grpc.StatusCode.UNAVAILABLE and "SETTINGS frame" in first:  # connected, never answered
        return f"the site worker at {socket} accepted the connection but does not answer (stopped or hung): {first}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"the site worker at {socket} is unreachable (is `fedtune client` still running?): {first}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the site worker at {socket} did not reply within {timeout:.0f} s (`{ROUND_TIMEOUT_KEY}`)"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the site worker at {socket} refused the token in {channel.token_path(socket)}"
    return f"the site worker at {socket} failed: {code.name if code else type(exc).__name__}: {first}"


def _refuse(msg: Message, reason: str) -> Message:
    log.error("%s", reason)
    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)
