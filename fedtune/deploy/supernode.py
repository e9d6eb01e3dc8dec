"""``python -m fedtune.deploy.supernode --poll-interval S [flower-supernode options]``: Flower's own
``flower-supernode``, with its pauses capped at ``S`` seconds.

Flower 1.42's SuperNode pulls from the SuperLink, and when no message is waiting it sleeps a hardcoded
3 s (``flwr.supernode.start_client_internal``; its waits for a local reply sleep 0.5 s). A site that
has just replied therefore picks up the server's next message up to 3 s late, twice a round (train,
then evaluate): about 6 s of every deployed round was this pause (BENCHMARKS.md, issue 17). The pause
is not a setting, so this entry point caps the ``time.sleep`` that one module sees, then runs Flower's
unchanged CLI. If a Flower release drops that pause, the cap has nothing to shorten: the SuperNode runs
as Flower's, and a warning says so. ``--poll-interval 3`` gives Flower's own timing.

Each idle pull is one request to the SuperLink, so ``S`` trades the SuperLink's request rate (one per
``S`` seconds per idle site) against how late a site starts each message. The default is Flower's own
3 s: with 0.5 s, one CI run of the deploy test that kills the server mid-round and resumes it hung
(a site's reply to the resumed run was never pushed, after its reply to the killed run had been
ignored; Flower's SuperNode pushes replies only after a pull that returned a message). Whether the
shorter pause makes that more likely is not known yet, so it is opt-in.
"""

from __future__ import annotations

import inspect
import sys
import time
import types
from collections.abc import Callable

FLOWER_IDLE_PAUSE = "time.sleep(3)"  # what this shortens, as flwr 1.42 writes it
DEFAULT_INTERVAL = 3.0  # Flower's own timing, until the resume case below is understood


def cap_pauses(module: types.ModuleType, interval: float, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Make ``module``'s ``time.sleep(s)`` sleep ``min(s, interval)``, leaving every other ``time``
    function (and every other module's ``time``) alone. False (nothing changed) when the module has no
    pause to cap."""
    if FLOWER_IDLE_PAUSE not in inspect.getsource(module):
        return False
    capped = types.ModuleType("time")
    capped.__dict__.update(vars(time))
    capped.sleep = lambda seconds: sleep(min(seconds, interval))  # type: ignore[attr-defined]
    module.time = capped  # type: ignore[attr-defined]
    return True


def split_args(argv: list[str]) -> tuple[float, list[str]]:
    """(``--poll-interval``'s value, the rest for ``flower-supernode``); ValueError, in one line, for a
    missing or non-positive value."""
    rest, interval = list(argv), DEFAULT_INTERVAL
    if "--poll-interval" in rest:
        at = rest.index("--poll-interval")
        text = rest[at + 1] if at + 1 < len(rest) else ""
        try:
            interval = float(text)
        except ValueError:
            interval = float("nan")
        if not interval > 0:  # also NaN
            raise ValueError(f"`--poll-interval` must be a number of seconds > 0, got {text!r}.")
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
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
