"""The SuperNode entry point caps the pauses of Flower's SuperNode loop, and nothing else's."""

from __future__ import annotations

import inspect
import time

import pytest
from flwr.supernode import start_client_internal

from fedtune.deploy import supernode


def test_the_idle_pause_is_capped_in_flowers_supernode_loop_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: record what would be slept instead of sleeping
    slept: list[float] = []
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)  # restored afterwards

    # Execute
    capped = supernode.cap_pauses(start_client_internal, 0.25, sleep=slept.append)
    start_client_internal.time.sleep(3)
    start_client_internal.time.sleep(0.1)

    # Assert: Flower's loop still has the pause (else the cap would shorten nothing), the pause is
    # capped, a shorter one is kept, the rest of `time` works, and the real module is untouched
    assert supernode.FLOWER_IDLE_PAUSE in inspect.getsource(start_client_internal)
    assert capped is True
    assert slept == [0.25, 0.1]
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
