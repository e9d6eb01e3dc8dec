"""``python -m fedtune.deploy.supernode --poll-interval S [flower-supernode options]``: Flower's own
``flower-supernode``, with its pauses capped at ``S`` seconds.

Flower 1.42's SuperNode pulls from the SuperLink, and when no message is waiting it sleeps a hardcoded
3 s (``flwr.supernode.start_client_internal``; its waits for a local reply sleep 0.5 s). A site that
has just replied therefore picks up the server's next message up to 3 s late, twice a round (train,
then evaluate): about 6 s of every deployed round was this pause (BENCHMARKS.md, issue 17). The pause
is not a setting, so this entry point caps the ``time.sleep`` that one module sees, then runs Flower's
unchanged CLI. The waits for a local reply (whether the ClientApp process has stored it, an in-memory
check) are capped at :data:`REPLY_CHECK` seconds, so a reply leaves as soon as it is there. If a
Flower release drops that pause, the cap has nothing to shorten: the SuperNode runs
as Flower's, and a warning says so. ``--poll-interval 3`` gives Flower's own timing.

Each idle pull is one request to the SuperLink, so ``S`` trades the SuperLink's request rate (one per
``S`` seconds per idle site) against how late a site starts each message. The default is 0.5 s.

A second change: Flower's loop pushes replies only right after a pull that returned a message, and then
only the replies already waiting, at least one. A stray reply (to a message of a run that has since
stopped, e.g. a server killed mid-round) can therefore be pushed in place of the reply to the message
just pulled; that reply then waits for a pull that never comes, because the server will not send
anything before it has it. The logs of one CI run that hung after a server restart fit this: the site's
reply to the killed run was pushed (and ignored) after it had pulled the resumed run's message, and its
reply to that message was never pushed. So an idle pull here also pushes any reply still waiting
(:func:`push_waiting_replies`).
"""

from __future__ import annotations

import inspect
import sys
import time
import types
from collections.abc import Callable

FLOWER_IDLE_PAUSE = "time.sleep(3)"  # what this shortens, as flwr 1.42 writes it
IDLE_SECONDS = 3.0  # that pause's length; Flower's shorter sleeps there wait for the local ClientApp
DEFAULT_INTERVAL = 0.5  # against Flower's 3 s: BENCHMARKS.md, "Deployed SmolLM2 rounds against Flower's Ray engine"
# Flower's SuperNode checks every 0.5 s whether the ClientApp process has stored its reply (an in-memory
# lookup, no request to anyone): the reply waited 0.25 s on average before it was sent, per message.
REPLY_CHECK = 0.05


def cap_pauses(module: types.ModuleType, interval: float, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Make ``module``'s ``time.sleep(s)`` sleep ``min(s, interval)`` for Flower's idle pause (3 s) and
    ``min(s, REPLY_CHECK)`` for its shorter waits for a local reply, leaving every other ``time``
    function (and every other module's ``time``) alone. False (nothing changed) when the module has no
    pause to cap."""
    if FLOWER_IDLE_PAUSE not in inspect.getsource(module):
        return False
    capped = types.ModuleType("time")
    capped.__dict__.update(vars(time))
    capped.sleep = lambda seconds: sleep(  # type: ignore[attr-defined]
        min(seconds, interval if seconds >= IDLE_SECONDS else REPLY_CHECK)
    )
    module.time = capped  # type: ignore[attr-defined]
    return True


def waiting_reply(state: object) -> int | None:
    """The run id of a reply in Flower's in-memory ``NodeState`` that no push has taken yet, else None.

    Reads the state under its own lock without marking anything retrieved, so Flower's
    ``_push_messages`` still finds the reply."""
    store, lock = getattr(state, "msg_store", None), getattr(state, "lock_msg_store", None)
    if store is None or lock is None:
        return None
    with lock:
        for entry in store.values():
            metadata = entry.message.metadata
            if metadata.reply_to_message_id and not entry.is_retrieved:
                return int(metadata.run_id)
    return None


def push_waiting_replies(module: types.ModuleType) -> bool:
    """Make an idle pull of ``module``'s SuperNode loop push any reply still waiting.

    Flower's loop calls ``_pull_and_store_message(state=..., ...)`` and, only when it returns a run id,
    ``_push_messages``, which pushes every reply not yet taken. The wrapper returns a waiting reply's
    run id when the pull found nothing, so that reply is pushed at once instead of never. False
    (nothing changed) when the module lacks either function."""
    pull = getattr(module, "_pull_and_store_message", None)
    if pull is None or not callable(getattr(module, "_push_messages", None)):
        return False

    def pull_or_push_waiting(*args: object, **kwargs: object) -> int | None:
        run_id: int | None = pull(*args, **kwargs)
        return waiting_reply(kwargs.get("state")) if run_id is None else run_id

    module._pull_and_store_message = pull_or_push_waiting  # type: ignore[attr-defined]
    return True


def parse_interval(text: str) -> float:
    """``--poll-interval``'s value in seconds; ValueError, in one line, unless it is a number > 0."""
    try:
        interval = float(text)
    except ValueError:
        interval = float("nan")
    if not interval > 0:  # also NaN
        raise ValueError(f"`--poll-interval` must be a number of seconds > 0, got {text!r}.")
    return interval


def split_args(argv: list[str]) -> tuple[float, list[str]]:
    """(``--poll-interval``'s value, the rest for ``flower-supernode``); ValueError, in one line, for a
    missing or non-positive value."""
    rest, interval = list(argv), DEFAULT_INTERVAL
    if "--poll-interval" in rest:
        at = rest.index("--poll-interval")
        interval = parse_interval(rest[at + 1] if at + 1 < len(rest) else "")
        del rest[at : at + 2]
    return interval, rest


def main(argv: list[str] | None = None) -> None:
    try:
        interval, rest = split_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if not cap_pauses(start_client_internal, interval):
        print(
            f"fedtune: this Flower's SuperNode has no {FLOWER_IDLE_PAUSE} pause; --poll-interval is not applied",
            file=sys.stderr,
        )
    if not push_waiting_replies(start_client_internal):
        print("fedtune: this Flower's SuperNode loop has changed; waiting replies wait for a pull", file=sys.stderr)
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
