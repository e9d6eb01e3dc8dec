"""`fedtune server`'s process plumbing: the supervisor that makes Flower's processes die with the
server, and the filter that turns `flwr run --stream` output into the line a user needs."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedtune.deploy import lifecycle, procs

# A stand-in for flower-superlink that, as Flower does, starts a child in a session of its own.
GRANDPARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(300)
"""
# A stand-in for `fedtune server`: starts the above supervised, prints both pids, then sleeps.
SERVER = f"""
import sys, time
from pathlib import Path
from fedtune.deploy import procs
proc = procs.start([sys.executable, "-c", {GRANDPARENT!r}], Path(sys.argv[1]))
print(proc.pid, flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_sigkill_of_the_parent_stops_every_process_it_started(tmp_path: Path) -> None:
    # Prepare: a server whose supervised child started a grandchild in another session
    log = tmp_path / "child.log"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(log)], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    supervisor = int(server.stdout.readline())
    assert wait_until(lambda: log.exists() and log.read_text().strip(), 30)
    grandchild = int(log.read_text().split()[0])
    pids = [supervisor, *procs_of(supervisor), grandchild]
    assert all(alive(p) for p in pids) and len(set(pids)) == 3, pids

    # Execute: the server dies without any clean-up
    server.kill()
    server.wait()

    # Assert: the supervisor, its child and the child's own-session child are all gone
    assert wait_until(lambda: not any(alive(p) for p in pids), 20), [p for p in pids if alive(p)]


def procs_of(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_supervisor_passes_the_exit_status_and_sigterm_gives_143(tmp_path: Path) -> None:
    # Execute: one command that exits 3, one that is stopped
    done = subprocess.run([*procs.supervised([sys.executable, "-c", "raise SystemExit(3)"])], check=False)
    stopped = subprocess.Popen(procs.supervised([sys.executable, "-c", "import time; time.sleep(300)"]))
    assert wait_until(lambda: len(Path(f"/proc/{stopped.pid}/task/{stopped.pid}/children").read_text().split()), 30)
    os.kill(stopped.pid, signal.SIGTERM)

    # Assert
    assert done.returncode == 3
    assert stopped.wait(timeout=30) == 128 + signal.SIGTERM


CAUSE = "only 0 of `server.min-clients` = 2 clients connected within `server.wait-for-clients` = 300 s."
# What `flwr run --stream` printed on this machine when no site connected (Flower 1.42, shortened):
# the traceback twice, once with Flower's timestamped prefix.
STREAM = f"""Successfully started run 15132344930740513185
round | sampled | replied | failed | train_loss | eval_loss | epsilon |        up |      down | seconds
\x1b[91mERROR \x1b[0m:     ServerApp raised an exception
Traceback (most recent call last):
  File "/venv/flwr/superlink/runtime/run_serverapp.py", line 221, in run_serverapp
    context = run_(
              ^^^^^
  File "/fedtune/server/exchange.py", line 24, in wait_for_nodes
    raise FedtuneError(
fedtune.core.errors.FedtuneError: {CAUSE}
12/02/2026 16:33:37:ERROR:ServerApp raised an exception
Traceback (most recent call last):
  File "/venv/flwr/superlink/runtime/run_serverapp.py", line 221, in run_serverapp
    context = run_(
fedtune.core.errors.FedtuneError: {CAUSE}
\x1b[91mERROR \x1b[0m:     Exit Code: 201

An unhandled exception occurred in the ServerApp.
12/02/2026 16:33:37:ERROR:Exit Code: 201
12/02/2026 16:33:37:DEBUG:[flwr-serverapp] Will push ServerApp task output
"""


def test_run_stream_hides_tracebacks_and_returns_the_cause(capsys: object) -> None:
    # Execute
    raw = io.StringIO()
    cause, run_id = lifecycle._forward(io.StringIO(STREAM), raw)

    # Assert: the cause is fedtune's own sentence, the run id Flower's; no traceback line was shown,
    # nor any timestamped copy; the raw log kept everything
    shown = capsys.readouterr().out  # type: ignore[attr-defined]
    assert cause == CAUSE
    assert run_id == 15132344930740513185
    assert "Traceback" not in shown and "File " not in shown and "16:33:37" not in shown, shown
    assert "round | sampled" in shown and "Exit Code: 201" in shown
    assert raw.getvalue() == STREAM


def test_run_stream_names_an_unexpected_exception_with_its_type(capsys: object) -> None:
    text = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: CUDA out of memory\n'
    cause, run_id = lifecycle._forward(io.StringIO(text), io.StringIO())
    assert (cause, run_id) == ("RuntimeError: CUDA out of memory", None)
    assert capsys.readouterr().out == ""  # type: ignore[attr-defined]
