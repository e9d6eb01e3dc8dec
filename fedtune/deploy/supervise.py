"""``python -m fedtune.deploy.supervise --parent PID -- CMD...``: run CMD so that it and every
process it starts die with PID, whatever signal killed PID (SIGKILL included).

Flower's ``flower-superlink`` starts ``flower-superexec``, which starts ``flwr-serverapp``, each in
its own process group, so stopping one group leaves the others running. This supervisor:

- asks Linux for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and checks the parent is
  still ``PID`` after asking (it may have died before);
- becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``), so the processes CMD starts are
  reparented to it, not to init, when their own parent goes, and it can still find them;
- on SIGTERM/SIGINT/SIGHUP, or when CMD exits, sends SIGTERM to every descendant, SIGKILL to what
  is left after a grace period, and exits with CMD's status (143 when it was told to stop).

CMD runs in the supervisor's process group, so ``kill -- -PID`` of that group reaches both; to stop
them cleanly, signal the supervisor alone (``kill PID``): it signals CMD once.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE = 5.0  # seconds between SIGTERM and SIGKILL (procs.stop waits 20 s for all of it)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def descendants(root: int) -> list[int]:
    """Live descendants of ``root`` (Linux ``/proc``), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], list(parents.get(root, []))
    while queue:
        pid = queue.pop(0)
        found.append(pid)
        queue += parents.get(pid, [])
    return found


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_tree(child: subprocess.Popen[bytes], grace: float = GRACE) -> None:
    """SIGTERM ``child`` once and let it stop what it started (Flower's SuperNode deactivates its
    node; a second signal would cut that short); then SIGTERM every descendant left, and SIGKILL
    what remains after ``grace``."""
    if child.poll() is None:
        child.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=grace)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while descendants(os.getpid()) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.1)
    _reap()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtune.deploy.supervise")
    parser.add_argument("--parent", type=int, required=True, help="stop everything when this process dies")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ...")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != args.parent:  # the parent died before the request took effect
        return 128 + signal.SIGTERM
    child = subprocess.Popen(cmd)
    while child.poll() is None and not stopping:
        time.sleep(0.2)
    stop_tree(child)
    child.wait()
    return 128 + stopping[0] if stopping else child.returncode


if __name__ == "__main__":
    sys.exit(main())
