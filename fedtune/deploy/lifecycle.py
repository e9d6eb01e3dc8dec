"""What ``fedtune server`` keeps about its own processes across restarts, and what it reads back.

- ``OUT/server.json``: the process settings a run was started with (the SuperLink's address, the
  key directory), reused by ``--resume`` unless given again.
- ``OUT/superlink.pid``: the SuperLink's process group; one still alive when a server starts is a
  leftover of an earlier crash, reported with the command that stops it.
- The output of ``flwr run --stream``: forwarded line by line, without the ServerApp's tracebacks
  (Flower prints each twice) and without Flower's timestamped copies of its own log lines; the
  whole stream is kept in ``OUT/flwr-run.log``, and the exception the ServerApp died of becomes
  the command's last line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedtune.core.errors import FedtuneError
from fedtune.deploy import procs

SETTINGS_FILE = "server.json"
PID_FILE = "superlink.pid"
RUN_LOG = "flwr-run.log"
# A line Flower's file handler repeats with a timestamp ("12/02/2026 16:33:37:ERROR:...").
_STAMPED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:[A-Z]+:")
# The exception line that ends a traceback: "package.module.SomeError: text" (or a bare name).
_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit))(?:: (.*))?$")
# Errors whose text is already a sentence for the user (fedtune's own); others keep their type.
_OWN = ("FedtuneError", "ConfigError")
_CHAINED = (
    "Traceback (most recent call last):",
    "During handling of the above exception",
    "The above exception was the direct cause",
)
_FLOWER_RUN = re.compile(r"Successfully started run (\d+)")


def save_settings(out: Path, settings: Mapping[str, str]) -> None:
    """Record the process settings of a run (written before the SuperLink starts)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(dict(settings), indent=2) + "\n")


def saved_settings(out: Path) -> dict[str, str]:
    """The settings a run was started with; empty for runs written before they were recorded."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedtuneError(f"{path}: cannot read the run's saved settings ({exc}).") from None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return "" if state == "Z" else raw.replace(b"\0", b" ").decode(errors="replace")


def check_leftover(out: Path) -> None:
    """Refuse to start while the SuperLink of an earlier server of ``out`` still runs."""
    path = out / PID_FILE
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    cmdline = _cmdline(pid)
    if "flower-superlink" in cmdline or "fedtune.deploy.supervise" in cmdline:
        raise FedtuneError(
            f"a SuperLink of an earlier server of {out} is still running (pid {pid}, from {path}); "
            f"stop it with `kill -- -{pid}` and start again."
        )


def stream_run(cmd: list[str], env: Mapping[str, str], out: Path) -> tuple[int, str, int | None]:
    """Run ``flwr run --stream``, forwarding its output without tracebacks.

    Returns its exit status, the exception the ServerApp died of ("" if none) and Flower's run id.
    """
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env),
        errors="replace",
        preexec_fn=procs.die_with_parent,  # no threads run in this process yet
    )
    assert proc.stdout is not None
    with (out / RUN_LOG).open("a") as raw:
        cause, run_id = _forward(proc.stdout, raw)
    return proc.wait(), cause, run_id


def _forward(lines: Iterable[str], raw: object) -> tuple[str, int | None]:
    cause, run_id, in_traceback = "", None, False
    for line in lines:
        raw.write(line)  # type: ignore[attr-defined]
        raw.flush()  # type: ignore[attr-defined]
        text = line.rstrip("\n")
        if run_id is None and (found := _FLOWER_RUN.search(text)):
            run_id = int(found.group(1))
        if text.startswith(_CHAINED):
            in_traceback = True
            continue
        if in_traceback:
            if text.startswith((" ", "\t")) or not text.strip():
                continue
            in_traceback = False
            if match := _EXCEPTION.match(text.strip()):
                name, message = match.group(1), (match.group(2) or "").strip()
                cause = message if name in _OWN and message else f"{name}: {message}".rstrip(": ")
            continue
        if _STAMPED.match(text):
            continue
        sys.stdout.write(line)
        sys.stdout.flush()
    return cause, run_id
