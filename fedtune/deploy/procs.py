"""Start and stop Flower's processes: each in its own session, stopped by process group."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from fedtune.core.errors import FedtuneError

# Flower's SuperLink otherwise runs `uv sync` for every run, which downloads packages or fails
# offline; telemetry is off as well.
SAFE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
# Flower's SuperExec (the SuperLink's, which starts the ServerApp, and each SuperNode's, which
# starts a ClientApp per message) looks for a new task every 1 s by default. A local HTTP call every
# 0.1 s costs little and takes up to 0.9 s off the run's start and off every message. A value the
# user exported wins. (The SuperNode's 3 s pause between pulls from the SuperLink is hardcoded.)
TUNED_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def flower_bin(name: str) -> str:
    """Flower's console script from this interpreter's environment (the venv need not be on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the safe defaults (and the venv's bin first on PATH)."""
    out = {**TUNED_ENV, **os.environ, **SAFE_ENV, **(extra or {})}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    return out


def exported() -> str:
    """The environment fedtune sets for Flower's processes, as ``K=V`` words (for --dry-run)."""
    return " ".join(f"{k}={v}" for k, v in {**TUNED_ENV, **SAFE_ENV}.items())


def show(cmd: list[str]) -> str:
    """A command as a shell line."""
    return shlex.join(cmd)


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do (uvicorn included): connections in TIME_WAIT do not make a port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def split_address(address: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or a clear error naming the flag."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedtuneError(f"`{key}` must be HOST:PORT, got {address!r}.")
    return host, int(port)


def supervised(cmd: list[str]) -> list[str]:
    """``cmd`` under :mod:`fedtune.deploy.supervise`: it and all it starts die with this process."""
    return [sys.executable, "-m", "fedtune.deploy.supervise", "--parent", str(os.getpid()), "--", *cmd]


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when this process dies (Linux)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def start(cmd: list[str], log: Path, extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` supervised (see :func:`supervised`) in a new session, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return subprocess.Popen(
            supervised(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env(extra_env), start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM a supervised process, then SIGKILL its group after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)  # the supervisor, which signals its command once
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what shares the group (a supervisor stopped the rest)
    proc.wait()


@contextlib.contextmanager
def running(cmd: list[str], log: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` for the duration of the block and always stop it (Ctrl-C included)."""
    proc = start(cmd, log, extra_env)
    try:
        yield proc
    finally:
        stop(proc)


def wait_for_port(
    proc: subprocess.Popen[bytes], name: str, host: str, port: int, log: Path, timeout: float = 60.0
) -> None:
    """Wait until ``proc`` listens on ``host:port``; if it exits first, raise with its last log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedtuneError(f"{name} exited ({proc.returncode}): {last_line(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise FedtuneError(f"nothing listens on {host}:{port} after {timeout:.0f} s; see {log}")


def last_line(log: Path) -> str:
    """The last non-empty line of a log file (what a user needs to see first)."""
    if not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""
