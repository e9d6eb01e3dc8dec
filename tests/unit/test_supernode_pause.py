"""The SuperNode entry point caps the pauses of Flower's SuperNode loop, and nothing else's, and pushes a
reply that Flower's loop would leave waiting. Flower's own NodeState, ObjectStore and push code run
here; only the SuperLink's side of the connection (``send``, ``push_object``) is recorded instead."""

from __future__ import annotations

import inspect
import time
from typing import Any

import pytest
from flwr.common import ConfigRecord, Message, Metadata, RecordDict
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate import NodeStateFactory

from fedtune.deploy import supernode


def test_the_idle_pause_is_capped_in_flowers_supernode_loop_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: record what would be slept instead of sleeping
    slept: list[float] = []
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)  # restored afterwards

    # Execute
    capped = supernode.cap_pauses(start_client_internal, 0.25, sleep=slept.append)
    start_client_internal.time.sleep(3)
    start_client_internal.time.sleep(0.5)  # Flower's wait for the ClientApp's reply
    start_client_internal.time.sleep(0.01)

    # Assert: Flower's loop still has the pause (else the cap would shorten nothing), the pause is
    # capped at the interval, a wait for a reply at REPLY_CHECK, a shorter one is kept, the rest of
    # `time` works, and the real module is untouched
    assert supernode.FLOWER_IDLE_PAUSE in inspect.getsource(start_client_internal)
    assert "time.sleep(0.5)" in inspect.getsource(start_client_internal._push_messages)
    assert capped is True
    assert slept == [0.25, supernode.REPLY_CHECK, 0.01]
    assert start_client_internal.time.monotonic() > 0
    assert time.sleep is not start_client_internal.time.sleep


def test_a_module_without_the_pause_is_left_as_it_is() -> None:
    from flwr.supernode import nodestate  # Flower's code without that pause

    assert supernode.cap_pauses(nodestate, 0.25, sleep=lambda s: None) is False
    assert not hasattr(nodestate, "time") or nodestate.time is time


def test_poll_interval_is_split_from_flowers_own_options() -> None:
    assert supernode.split_args(["--poll-interval", "0.2", "--superlink", "h:1"]) == (0.2, ["--superlink", "h:1"])
    assert supernode.split_args(["--superlink", "h:1"]) == (supernode.DEFAULT_INTERVAL, ["--superlink", "h:1"])


@pytest.mark.parametrize("argv", [["--poll-interval"], ["--poll-interval", "x"], ["--poll-interval", "0"]])
def test_a_bad_poll_interval_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        supernode.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "`--poll-interval` must be a number of seconds > 0" in err, err


def instruction(run_id: int, round_: int) -> Message:
    """A train message of ``run_id`` as the SuperLink would deliver it."""
    metadata = Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id=str(round_),
        created_at=time.time(),
        ttl=600.0,
        message_type="train",
    )
    return Message(RecordDict({"config": ConfigRecord({"round": round_})}), metadata=metadata)


def test_a_reply_left_behind_by_a_stray_reply_is_pushed_by_the_next_idle_pull(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the state after a server restart, as one CI run's logs showed it. The site holds the
    # resumed run's message (run 7) and a reply to the killed run's message (run 5), which Flower's
    # push takes in place of the reply to run 7's message; that reply arrives only afterwards.
    objects = ObjectStoreFactory()
    state, store = NodeStateFactory(objects).state(), objects.store()
    killed, resumed = instruction(5, 2), instruction(7, 1)
    for message in (killed, resumed):
        start_client_internal._insert_message(message, state, store)
    start_client_internal._insert_message(Message(RecordDict(), reply_to=killed), state, store)
    sent: list[tuple[int, str]] = []

    def send(message: Message, tree: Any, runtime: float) -> tuple[set[str], str]:
        sent.append((message.metadata.run_id, message.metadata.reply_to_message_id))
        return set(), "session"

    def push() -> None:
        start_client_internal._push_messages(state=state, object_store=store, send=send, push_object=lambda *a: None)

    def idle_pull() -> int | None:
        result: int | None = start_client_internal._pull_and_store_message(
            state=state,
            object_store=store,
            node_config={},
            receive=lambda: None,  # the SuperLink has nothing for this site
            get_run=None,
            get_fab=None,
            pull_object=None,
            confirm_message_received=None,
            trusted_entities=None,
        )
        return result

    push()  # what Flower's loop does right after pulling run 7's message
    start_client_internal._insert_message(Message(RecordDict(), reply_to=resumed), state, store)
    flowers = idle_pull()

    # Execute
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", start_client_internal._pull_and_store_message)
    assert supernode.push_waiting_replies(start_client_internal) is True
    ours = idle_pull()
    if ours is not None:  # Flower's loop pushes only after a pull that returned a run id
        push()

    # Assert: Flower's own pull leaves run 7's reply waiting; ours makes the loop push it, once
    assert sent == [(5, killed.metadata.message_id), (7, resumed.metadata.message_id)]
    assert flowers is None and ours == 7
    assert idle_pull() is None and supernode.waiting_reply(state) is None


def test_push_waiting_replies_leaves_a_module_without_flowers_loop_alone() -> None:
    from flwr.supernode import nodestate

    assert supernode.push_waiting_replies(nodestate) is False
    assert supernode.waiting_reply(object()) is None
