"""The site worker over its real gRPC channel (a Unix socket in a private directory, in this
process): it answers exactly as the in-process ClientApp does, carries ``context.state`` both ways,
refuses callers without the site's token, and a dead or hanging worker is an Error reply naming the
socket, never a hang."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client import channel, edge
from fedtune.client.app import app as client_app
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.core.errors import FedtuneError
from fedtune.deploy.worker import SiteWorker, start_server
from fedtune.model.adapters import adapter_arrays, init_adapter, wrap_lora
from fedtune.model.loading import load_base, pick_device
from fedtune.server.send import round_content
from fedtune.wire import keys
from fedtune.wire.records import read_arrays

ClientFn = Callable[[Message, Context], Message]


@pytest.fixture
def private_dir() -> Iterator[Path]:
    directory = channel.new_private_dir()  # short path: a Unix socket path must fit 108 bytes
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def serving(directory: Path, app: ClientFn) -> grpc.Server:
    token = channel.read_token(channel.socket_path(directory))
    return start_server(directory, SiteWorker(token, load_app=lambda: app))


def context(node_config: dict[str, bool | int | float | str], state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=state or RecordDict(), run_config={})


def round_message(tiny_model: Path, kind: str, **flat: bool | int | float | str) -> Message:
    cfg = Plan.from_flat({**preset("tiny"), "model.name": str(tiny_model), **flat}).base
    model = wrap_lora(load_base(cfg.model, pick_device("auto")), cfg.lora)
    init_adapter(model, cfg.seed)
    return Message(round_content(adapter_arrays(model), cfg, 1), dst_node_id=7, message_type=kind, group_id="1")


@pytest.mark.usefixtures("task_identity")
def test_a_round_through_the_worker_equals_the_in_process_handlers(tiny_model: Path, private_dir: Path) -> None:
    # Prepare: the real ClientApp behind a real worker socket
    server = serving(private_dir, client_app)
    sock = channel.socket_path(private_dir)
    node = {keys.PARTITION_ID: 1, keys.NUM_PARTITIONS: 3}
    try:
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            msg = round_message(tiny_model, kind)

            # Execute
            direct = client_app(msg, context(node))
            forwarded = edge.handle(msg, context({**node, keys.WORKER: str(sock)}))

            # Assert: the same reply, bit for bit, addressed to the same message
            assert not forwarded.has_error(), forwarded.error.reason if forwarded.has_error() else ""
            assert forwarded.metadata.reply_to_message_id == direct.metadata.reply_to_message_id
            timeless = [  # a site's own seconds (time-load, time-train, ...) differ from run to run
                {k: v for k, v in reply.content.metric_records[keys.METRICS].items() if not k.startswith("time-")}
                for reply in (forwarded, direct)
            ]
            assert timeless[0] == timeless[1]
            if kind == MessageType.TRAIN:
                ours = read_arrays(forwarded.content, keys.DELTA)
                theirs = read_arrays(direct.content, keys.DELTA)
                assert ours.keys() == theirs.keys() and ours
                assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    finally:
        server.stop(grace=None)


def counting_app(calls: list[str]) -> ClientApp:
    """A ClientApp that counts rounds in ``context.state`` and raises on evaluate."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        calls.append("train")
        seen = int(ctx.state.config_records.get("site", ConfigRecord({"rounds": 0}))["rounds"])  # type: ignore[arg-type]
        ctx.state["site"] = ConfigRecord({"rounds": seen + 1})
        return Message(RecordDict(), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        calls.append("evaluate")
        raise RuntimeError("boom at the site")

    return app


def plain_message(kind: str, round_timeout: float = 30.0) -> Message:
    spec = ConfigRecord({edge.ROUND_TIMEOUT_KEY: round_timeout, keys.ROUND: 1})
    return Message(RecordDict({keys.SPEC: spec}), dst_node_id=7, message_type=kind, group_id="1")


@pytest.mark.usefixtures("task_identity")
def test_context_state_comes_back_and_a_raising_handler_is_an_error_reply(private_dir: Path) -> None:
    # Prepare
    calls: list[str] = []
    server = serving(private_dir, counting_app(calls))
    ctx = context({keys.WORKER: str(channel.socket_path(private_dir))})
    try:
        # Execute: two train rounds, then an evaluate whose handler raises
        for _ in range(2):
            assert not edge.handle(plain_message(MessageType.TRAIN), ctx).has_error()
        failed = edge.handle(plain_message(MessageType.EVALUATE), ctx)
    finally:
        server.stop(grace=None)

    # Assert: the state the worker wrote is the ClientApp's context.state; the worker survived
    assert ctx.state.config_records["site"]["rounds"] == 2
    assert failed.has_error() and "boom at the site" in failed.error.reason
    assert calls == ["train", "train", "evaluate"]


@pytest.mark.usefixtures("task_identity")
def test_a_wrong_or_missing_token_is_refused_before_the_handler_runs(private_dir: Path) -> None:
    # Prepare
    calls: list[str] = []
    server = serving(private_dir, counting_app(calls))
    sock = channel.socket_path(private_dir)
    request = channel.pack(plain_message(MessageType.TRAIN), context({}))
    codes = []
    try:
        # Execute: a raw caller without the token, one with a wrong token, and the ClientApp edge
        # after the token file was replaced
        with grpc.insecure_channel(f"unix:{sock}") as chan:
            call = chan.unary_unary(channel.METHOD)
            for metadata in ([], [(channel.TOKEN_HEADER, "0" * 64)]):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, timeout=10, metadata=metadata)
                codes.append(info.value.code())  # type: ignore[attr-defined]
        channel.token_path(sock).write_text("f" * 64)
        reply = edge.handle(plain_message(MessageType.TRAIN), context({keys.WORKER: str(sock)}))
    finally:
        server.stop(grace=None)

    # Assert
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2
    assert reply.has_error() and f"the site worker at {sock} refused the token" in reply.error.reason
    assert calls == []


def connect_as_nobody(sock: Path) -> str:
    """In a forked child that dropped to user nobody: connect to ``sock``; the outcome's name."""
    outcomes = ["connected", "PermissionError", "other error"]
    pid = os.fork()
    if pid == 0:  # the child touches no gRPC state and leaves with os._exit
        code = 2
        try:
            os.setgid(65534)
            os.setuid(65534)
            socket.socket(socket.AF_UNIX).connect(str(sock))
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return outcomes[os.waitstatus_to_exitcode(status)]


def test_the_socket_and_its_directory_are_private(private_dir: Path) -> None:
    # Prepare
    server = serving(private_dir, counting_app([]))
    sock = channel.socket_path(private_dir)
    try:
        modes = [stat.S_IMODE(p.stat().st_mode) for p in (private_dir, sock, channel.token_path(sock))]
        # Execute: another user tries to connect (possible to test only as root)
        other = connect_as_nobody(sock) if os.geteuid() == 0 else None
    finally:
        server.stop(grace=None)

    # Assert
    assert modes == [0o700, 0o600, 0o600]
    if other is not None:
        assert other == "PermissionError"


@pytest.mark.usefixtures("task_identity")
def test_an_unreachable_or_hanging_worker_is_one_error_line_naming_the_socket(private_dir: Path) -> None:
    # Prepare: no worker listening yet; then one whose handler outlasts the round timeout
    sock = channel.socket_path(private_dir)
    release = threading.Event()

    def hanging(msg: Message, ctx: Context) -> Message:
        release.wait(30)
        return Message(RecordDict(), reply_to=msg)

    # Execute
    unreachable = edge.handle(plain_message(MessageType.TRAIN), context({keys.WORKER: str(sock)}))
    server = serving(private_dir, hanging)
    try:
        hung = edge.handle(plain_message(MessageType.TRAIN, round_timeout=1), context({keys.WORKER: str(sock)}))
    finally:
        release.set()
        server.stop(grace=None)

    # Assert
    assert unreachable.has_error() and unreachable.error.code == edge.ERROR_CODE
    assert f"the site worker at {sock} is unreachable" in unreachable.error.reason
    assert "\n" not in unreachable.error.reason
    assert hung.has_error() and f"the site worker at {sock} did not reply within 1 s" in hung.error.reason


def test_the_worker_refuses_a_directory_others_can_enter(tmp_path: Path) -> None:
    # Prepare
    open_dir = tmp_path / "shared"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)

    # Execute
    with pytest.raises(FedtuneError, match="must be a directory of this user with mode 0700"):
        channel.check_private_dir(open_dir)
    result = subprocess.run(
        [sys.executable, "-m", "fedtune.deploy.worker", "--dir", str(open_dir)], capture_output=True, text=True
    )

    # Assert: one line, non-zero exit, and no socket was created
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"fedtune site worker: error: `--dir`: {open_dir} must be a directory of this user with mode 0700."
    ]
    assert not (open_dir / channel.SOCKET_NAME).exists()
