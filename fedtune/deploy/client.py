"""``fedtune client``: a real ``flower-supernode`` at a data site, with TLS and its auth key.

The site's data path and its local settings travel as node config; only the ClientApp's replies
(adapter deltas and metrics) leave the site. By default a long-lived site worker
(:mod:`fedtune.deploy.worker`) runs beside the SuperNode and keeps the base model resident; the
per-message ClientApp forwards to it (``--no-worker``: every message loads everything itself).
``--dry-run`` prints the commands.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fedtune.client import channel
from fedtune.config import SITE_KEYS, RunConfig, Scalar, toml_scalar
from fedtune.config.presets import PRESET_SITES
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.core.paths import tiny_model_dir
from fedtune.deploy import procs
from fedtune.deploy.supernode import DEFAULT_INTERVAL
from fedtune.wire import keys

GPU_KEYS = ("model.quantization", "model.device-map", "train.precision", "train.num-processes", "train.device")
WORKER_START_TIMEOUT = 60.0  # seconds until the worker must listen (it binds before heavy imports)


def site_settings(sets: dict[str, Scalar]) -> dict[str, Scalar]:
    """Validate ``--set`` for a site: only SITE_KEYS, with values of the right type."""
    for key in sets:
        if key not in SITE_KEYS:
            raise ConfigError(f"`--set {key}`: a site may set only {', '.join(SITE_KEYS)}.")
    probe = {k: v for k, v in sets.items() if k != "lora.r"}
    RunConfig().override(probe)  # raises naming the key if a value has the wrong type
    if "lora.r" in sets and (not isinstance(sets["lora.r"], int) or isinstance(sets["lora.r"], bool)):
        raise ConfigError(f"`lora.r` must be an integer, got {sets['lora.r']!r}.")
    return sets


def node_index(auth_key: Path) -> int | None:
    """K of a ``node-K.key`` file, else None."""
    stem = auth_key.stem
    return int(stem.split("-", 1)[1]) if stem.startswith("node-") and stem.split("-", 1)[1].isdigit() else None


def build_node_config(
    *,
    data: Path | None,
    preset: str | None,
    auth_key: Path,
    share: str | None,
    device: str | None,
    sets: dict[str, Scalar],
) -> dict[str, Scalar]:
    """The SuperNode's node config: the site's data, its demo share (presets), its own settings."""
    config: dict[str, Scalar] = dict(site_settings(sets))
    if device:
        config["train.device"] = device
    if any(k in config for k in GPU_KEYS):  # refuse what this machine cannot run before joining
        from fedtune.model.hardware import check_site  # imports torch: only when a GPU setting is given
        from fedtune.privacy.compat import check_round

        own = RunConfig().override({k: v for k, v in config.items() if k != "lora.r"})
        check_round(own)
        check_site(own, "this site")
    if preset is not None:
        if preset == "tiny" and "model.name" not in config:
            if not (tiny_model_dir() / "config.json").is_file():  # the builder imports torch: only once
                from fedtune.model.tiny import build_tiny_model

                build_tiny_model(tiny_model_dir())
            config["model.name"] = str(tiny_model_dir())
        k, n = _share(share, auth_key, PRESET_SITES[preset])
        config[keys.PARTITION_ID], config[keys.NUM_PARTITIONS] = k - 1, n
    if data is not None:
        if not data.is_file() and not data.is_dir():
            raise FedtuneError(f"`--data`: no such file or directory: {data}")
        config[keys.DATA_PATH] = str(data.resolve())
    if keys.DATA_PATH not in config and keys.PARTITION_ID not in config:
        raise ConfigError("`--data` is required (or `--preset tiny|smollm2` for the built-in demo share).")
    return config


def _share(share: str | None, auth_key: Path, default_n: int) -> tuple[int, int]:
    if share:
        k_text, _, n_text = share.partition("/")
        if not (k_text.isdigit() and n_text.isdigit() and 1 <= int(k_text) <= int(n_text)):
            raise ConfigError(f"`--share` must be K/N with 1 <= K <= N, got {share!r}.")
        return int(k_text), int(n_text)
    k = node_index(auth_key)
    if k is None or k > default_n:
        raise ConfigError(f"`--share K/N` is needed: {auth_key.name} is not node-1..node-{default_n}.")
    return k, default_n


def free_port() -> int:
    """A free local TCP port for the SuperNode's runtime API."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def supernode_command(
    superlink: str,
    root_cert: Path | None,
    auth_key: Path,
    node_config: dict[str, Scalar],
    port: int,
    max_retries: int | None,
    poll_interval: float = DEFAULT_INTERVAL,
) -> list[str]:
    """The SuperNode's command line: Flower's ``flower-supernode`` run through
    :mod:`fedtune.deploy.supernode`, which caps its idle pause at ``poll_interval`` seconds."""
    cmd = [sys.executable, "-m", "fedtune.deploy.supernode", "--poll-interval", f"{poll_interval:g}"]
    cmd += ["--superlink", superlink]
    cmd += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    if root_cert is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    cmd += ["--port", str(port), "--node-config", " ".join(f"{k}={toml_scalar(v)}" for k, v in node_config.items())]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


HINTS = {
    "2004": "the SuperLink refused this node: its public key is not registered there",
    "2001": "the SuperLink requires SuperNode authentication: pass this site's --auth-key",
    "CERTIFICATE_VERIFY_FAILED": "TLS verification failed: --root-cert is not the CA of the server certificate",
    "Giving up reconnection": "could not reach the SuperLink (wrong address, or it needs TLS and --insecure was given)",
}


def worker_command(directory: Path) -> list[str]:
    """The site worker's command line."""
    return [sys.executable, "-m", "fedtune.deploy.worker", "--dir", str(directory)]


@contextlib.contextmanager
def worker_dir(enabled: bool, dry_run: bool = False) -> Iterator[Path | None]:
    """The site worker's private directory (0700, with its token) for the block, then removed;
    None with ``--no-worker``, and only a placeholder name for ``--dry-run``."""
    if not enabled:
        yield None
    elif dry_run:
        yield Path(tempfile.gettempdir()) / "fedtune-worker-(made-at-start)"
    else:
        directory = channel.new_private_dir()
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def site_worker(directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run the site worker for the block and always stop it.

    It stays in this process's group, so a signal to ``fedtune client`` (Ctrl-C, or SIGSTOP to the
    whole site) reaches it too, and it stops itself if this process dies.
    """
    proc = subprocess.Popen(worker_command(directory), env=procs.env())
    try:
        sock = channel.socket_path(directory)
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not sock.exists():
            if proc.poll() is not None:
                raise FedtuneError(f"the site worker exited with status {proc.returncode}; see its output above.")
            if time.monotonic() > deadline:
                raise FedtuneError(f"the site worker did not listen on {sock} within {WORKER_START_TIMEOUT:.0f} s.")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


REFUSED_UNREGISTERED = "2004"  # Flower: no SuperNode with this public key is registered
REPLACED = "401 Unauthorized"  # the SuperLink does not know this node id (Flower then exits 0)
RETRY_PAUSE = 2.0  # seconds between attempts while the key is not registered yet


def join(cmd: list[str], worker: Path | None = None, *, register_wait: float = 60.0) -> None:
    """Run the SuperNode in the foreground (with the site worker in ``worker``, if given), echoing
    its output; a failure of either ends in one clear line.

    While the SuperLink refuses this site's key as unregistered (the server may still be
    registering the keys), the SuperNode is started again for up to ``register_wait`` seconds.
    """
    with contextlib.ExitStack() as stack:
        helper = stack.enter_context(site_worker(worker)) if worker is not None else None
        deadline = time.monotonic() + register_wait
        while True:
            status, text = _supernode(cmd, helper)
            if status and REFUSED_UNREGISTERED in text and time.monotonic() + RETRY_PAUSE < deadline:
                left = deadline - time.monotonic()
                print(
                    "fedtune client: this site's key is not registered at the SuperLink yet; "
                    f"retrying ({left:.0f} s left)",
                    flush=True,
                )
                time.sleep(RETRY_PAUSE)
                continue
            break
    # Flower's SuperNode stops itself, with status 0, on a 401 from any Fleet call (heartbeat, pull,
    # push): the SuperLink does not know its node id. It exits 0 for nothing else.
    if status == 0 or REPLACED in text:
        raise FedtuneError(
            f"the SuperLink at {cmd[cmd.index('--superlink') + 1]} no longer knows this node: the server's keys or "
            "database changed (a new server run); register this site again and restart `fedtune client`."
        )
    if status:
        hint = next((h for needle, h in HINTS.items() if needle in text), "see its output above")
        raise FedtuneError(f"flower-supernode exited with status {status}: {hint}.")


def _supernode(cmd: list[str], worker: subprocess.Popen[bytes] | None) -> tuple[int, str]:
    """Run one SuperNode until it exits; its exit status and the tail of its output."""
    tail: collections.deque[str] = collections.deque(maxlen=80)
    proc = subprocess.Popen(  # supervised: the SuperNode and its SuperExec die with this process
        procs.supervised(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=procs.env(),
        start_new_session=True,
    )

    def forward() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when every process of the group has closed the pipe
            sys.stdout.write(line)
            sys.stdout.flush()  # line by line also when stdout is a file (a site's log)
            tail.append(line)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    try:
        while proc.poll() is None:  # the SuperNode itself; its SuperExec child would keep the pipe open
            if worker is not None and worker.poll() is not None:
                raise FedtuneError(f"the site worker exited with status {worker.returncode}; see its output above.")
            time.sleep(0.5)
    finally:
        procs.stop(proc)  # type: ignore[arg-type]  # the whole group, SuperExec included
        reader.join(timeout=5)
    return proc.returncode, "".join(tail)
