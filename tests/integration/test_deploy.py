"""A real deployment on 127.0.0.1: flower-superlink with TLS and SuperNode auth, three SuperNodes.

Everything goes through the user-facing commands (`fedtune keys`, `fedtune server`, `fedtune
client`); every process the test starts is stopped by its process group, even when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Starts fedtune commands in their own sessions and stops them all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.started:  # SIGTERM first: fedtune stops the Flower processes it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pidfile in self.root.rglob("superlink.pid"):  # belt and braces
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_tls_authenticated_deployment_trains_and_refuses_an_unregistered_node(
    processes: Processes, tmp_path: Path
) -> None:
    # Prepare: keys for 3 sites, and one key pair the server never heard of
    for out, n in (("keys", 3), ("intruder", 1)):
        subprocess.run(
            [sys.executable, "-m", "fedtune.cli", "keys", "--out", str(tmp_path / out), "--nodes", str(n)],
            check=True,
            env=ENV,
        )
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"

    # Execute
    server = processes.start(
        "server",
        *("server", "--keys", str(tmp_path / "keys"), "--preset", "tiny", "--out", str(run), "--address", address),
        *("--rounds", "2", "--set", "server.min-clients=3", "--set", "eval.federated=false"),
    )
    wait_for(lambda: (run / "superlink.pid").exists() or server.poll() is not None, 120, "the SuperLink")
    assert server.poll() is None, processes.log("server")
    tls = ("--superlink", address, "--root-cert", str(tmp_path / "keys" / "ca.pem"))
    for k in (1, 2, 3):
        processes.start(
            f"client-{k}",
            "client",
            *tls,
            "--auth-key",
            str(tmp_path / "keys" / "nodes" / f"node-{k}.key"),
            "--preset",
            "tiny",
        )
    intruder = processes.start(
        *("intruder", "client", *tls, "--auth-key", str(tmp_path / "intruder" / "nodes" / "node-1.key")),
        *("--preset", "tiny"),
    )
    plaintext = processes.start(
        *("plaintext", "client", "--superlink", address, "--insecure", "--max-retries", "2"),
        *("--auth-key", str(tmp_path / "keys" / "nodes" / "node-1.key"), "--preset", "tiny"),
    )
    assert intruder.wait(timeout=120) != 0
    assert plaintext.wait(timeout=120) != 0
    assert server.wait(timeout=400) == 0, processes.log("server")[-3000:]

    # Assert: the refused node and the client without TLS each got one clear line
    assert "its public key is not registered" in processes.log("intruder"), processes.log("intruder")[-2000:]
    assert "could not reach the SuperLink" in processes.log("plaintext"), processes.log("plaintext")[-2000:]
    # the run trained with all three sites and wrote a vanilla PEFT adapter
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["replied"] == 3 and r["failed"] == 0 for r in rows[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), str(run / "adapter")
    )
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    # and the SuperLink was stopped with the server
    assert not alive(int((run / "superlink.pid").read_text()))


def rows_of(run: Path) -> list[dict[str, object]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_federation(processes: Processes, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "keys", "--out", str(tmp_path / "keys"), "--nodes", "3"],
        check=True,
        env=ENV,
    )
    address, run = f"127.0.0.1:{free_port()}", tmp_path / "run"
    server = processes.start(
        "server",
        "server",
        "--keys",
        str(tmp_path / "keys"),
        "--preset",
        "tiny",
        "--out",
        str(run),
        "--address",
        address,
        *extra,
    )
    wait_for(lambda: (run / "superlink.pid").exists() or server.poll() is not None, 120, "the SuperLink")
    for k in (1, 2, 3):
        start_client(processes, tmp_path, address, k)
    return server, address, run


def start_client(processes: Processes, tmp_path: Path, address: str, k: int, tag: str = "") -> subprocess.Popen[bytes]:
    return processes.start(
        f"client-{k}{tag}",
        *("client", "--superlink", address, "--root-cert", str(tmp_path / "keys" / "ca.pem")),
        *("--auth-key", str(tmp_path / "keys" / "nodes" / f"node-{k}.key"), "--preset", "tiny"),
    )


def test_a_client_lost_mid_round_is_recorded_and_rejoins(processes: Processes, tmp_path: Path) -> None:
    # Prepare
    server, address, run = start_federation(
        processes,
        tmp_path,
        *("--rounds", "3", "--set", "server.min-clients=2", "--set", "server.min-replies=2"),
        *("--set", "server.round-timeout=120", "--set", "eval.federated=false"),
    )
    wait_for(lambda: len(rows_of(run)) >= 1, 240, "round 0")

    # Execute: site 3 goes away as round 1 starts, then comes back
    victim = processes.started[-1]
    os.killpg(victim.pid, signal.SIGTERM)
    victim.wait(timeout=30)
    wait_for(lambda: len(rows_of(run)) >= 2, 240, "round 1")
    start_client(processes, tmp_path, address, 3, tag="-again")
    assert server.wait(timeout=400) == 0, processes.log("server")[-3000:]

    # Assert: round 1 completed without the lost site, which is recorded by node id; it rejoined
    rows = rows_of(run)
    first = rows[1]
    assert (first["replied"], first["failed"], first["updated"]) == (2, 1, True), first
    (failure,) = first["failures"]  # type: ignore[misc]
    assert isinstance(failure["node"], int) and failure["node"] in first["sampled_nodes"]  # type: ignore[operator]
    assert "Node Unavailable" in failure["reason"] or "round-timeout" in failure["reason"], failure
    assert any(failure["node"] in r["replied_nodes"] for r in rows[2:]), rows  # type: ignore[operator]


def test_server_killed_after_round_1_resumes_and_equals_an_uninterrupted_run(
    processes: Processes, tmp_path: Path, tiny_model: Path
) -> None:
    # Prepare
    extra = ("--rounds", "3", "--seed", "4", "--set", "server.min-clients=3", "--set", "eval.federated=false")
    server, address, run = start_federation(processes, tmp_path, *extra)
    wait_for(lambda: len(rows_of(run)) >= 2, 300, "round 1")

    # Execute: the server host "dies" (fedtune server and its SuperLink, no clean-up), then resumes
    os.killpg(server.pid, signal.SIGKILL)
    os.killpg(int((run / "superlink.pid").read_text()), signal.SIGKILL)
    server.wait(timeout=30)
    resumed = processes.start(
        "server-resumed", "server", "--resume", str(run), "--keys", str(tmp_path / "keys"), "--address", address
    )
    assert resumed.wait(timeout=400) == 0, processes.log("server-resumed")[-3000:]

    # Assert: every round once in metrics.jsonl, and the adapter of an uninterrupted run of the same
    # plan (computed in-process with the shared backend, which gives the same numbers)
    assert [r["round"] for r in rows_of(run)] == [0, 1, 2, 3]
    from safetensors.numpy import load_file

    from fedtune.client.app import app as client_app
    from fedtune.server.app import run_server
    from fedtune.server.checkpoint import saved_plan
    from fedtune.simulations.local import LocalGrid
    from fedtune.strategies.plan import Plan

    plan = Plan.from_flat({**saved_plan(run), "output.dir": str(tmp_path / "straight"), "output.resume": False})
    run_server(plan, LocalGrid(client_app, 3))
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed_adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for key, value in straight.items():
        assert abs(resumed_adapter[key] - value).max() <= 1e-6, key


def test_secure_aggregation_runs_deployed(processes: Processes, tmp_path: Path) -> None:
    # Prepare: three authenticated sites over TLS, each message handled by a fresh ClientApp process, so
    # a site's keys, seed and shares must survive between stages in its context state
    server, _, run = start_federation(
        processes,
        tmp_path,
        *("--rounds", "1", "--set", "server.min-clients=3", "--set", "eval.federated=false"),
        *("--set", "secagg.protocol=secagg"),
    )

    # Execute
    assert server.wait(timeout=500) == 0, processes.log("server")[-3000:]

    # Assert: the round unmasked the sum of all three sites' inputs
    rows = rows_of(run)
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows[1:]:
        info = row["secagg"]
        assert row["updated"] and row["replied"] == 3 and row["failed"] == 0, row
        assert isinstance(info, dict) and info["survivors"] == 3 and info["threshold"] == 2
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]  # type: ignore[operator]
