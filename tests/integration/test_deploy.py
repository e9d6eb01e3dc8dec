"""A real deployment on 127.0.0.1: flower-superlink with TLS and SuperNode auth, three SuperNodes.

Everything goes through the user-facing commands (`fedtune server`, `fedtune client`, with the
site worker unless `--no-worker`); one key set serves every test (each server registers it in its
own database). Every process a test starts is stopped by its process group, even when it fails.
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

from fedtune.deploy import procs
from fedtune.deploy.keys import make_keys

# One thread per process: a server and three sites share this machine's cores, and torch's OpenMP
# threads waiting for each other on oversubscribed cores made a tiny round 30-100x slower.
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


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
            for sig in (signal.SIGTERM, signal.SIGCONT):  # a stopped group handles SIGTERM once continued
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pidfile in self.root.rglob("superlink.pid"):  # belt and braces
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys for 3 sites (keyset/keys) and one key pair no server knows (keyset/intruder)."""
    root = tmp_path_factory.mktemp("keyset")
    make_keys(root / "keys", 3, ["localhost", "127.0.0.1"])
    make_keys(root / "intruder", 1, ["localhost", "127.0.0.1"])
    return root


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
    processes: Processes, tmp_path: Path, keyset: Path
) -> None:
    # Prepare: the sites' keys, and one key pair the server never heard of
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"

    # Execute
    server = processes.start(
        "server",
        *("server", "--keys", str(keyset / "keys"), "--preset", "tiny", "--out", str(run), "--address", address),
        *("--rounds", "2", "--set", "server.min-clients=3", "--set", "eval.federated=false"),
        *("--set", "plan.2.secagg.protocol=secagg"),  # round 2: SecAgg+, four exchanges per site
    )
    wait_for(lambda: "sites can join now" in processes.log("server") or server.poll() is not None, 120, "the SuperLink")
    assert server.poll() is None, processes.log("server")
    tls = ("--superlink", address, "--root-cert", str(keyset / "keys" / "ca.pem"))
    for k in (1, 2, 3):  # site 3 without the site worker: Flower's process per message loads everything
        key = str(keyset / "keys" / "nodes" / f"node-{k}.key")
        no_worker = ("--no-worker",) if k == 3 else ()
        processes.start(f"client-{k}", "client", *tls, "--auth-key", key, "--preset", "tiny", *no_worker)
    # the two refused nodes without a site worker: its start-up import of the training stack would
    # only compete for the cores with the server and the sites (the refusal is the SuperNode's)
    intruder = processes.start(
        *("intruder", "client", *tls, "--auth-key", str(keyset / "intruder" / "nodes" / "node-1.key")),
        *("--preset", "tiny", "--register-wait", "0", "--no-worker"),
    )
    plaintext = processes.start(
        *("plaintext", "client", "--superlink", address, "--insecure", "--max-retries", "2"),
        *("--auth-key", str(keyset / "keys" / "nodes" / "node-1.key"), "--preset", "tiny", "--no-worker"),
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
    # round 2 unmasked the sum of all three sites' masked inputs; site 3 kept its SecAgg+ state
    # between stages in context.state across Flower's fresh ClientApp processes
    secure = rows[2]["secagg"]
    assert rows[2]["updated"] and secure["survivors"] == 3 and not secure.get("abandoned"), secure
    # sites 1 and 2 trained in their site workers, site 3 in Flower's ClientApp processes
    assert all("site worker: train (round 1)" in processes.log(f"client-{k}") for k in (1, 2))
    assert all("site worker: train.secagg (round 2)" in processes.log(f"client-{k}") for k in (1, 2))
    assert "site worker" not in processes.log("client-3") and "Sending: train" in processes.log("client-3")
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


def start_federation(
    processes: Processes, keyset: Path, tmp_path: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], str, Path]:
    address, run = f"127.0.0.1:{free_port()}", tmp_path / "run"
    server = processes.start(
        "server",
        *("server", "--keys", str(keyset / "keys"), "--preset", "tiny", "--out", str(run), "--address", address),
        *extra,
    )
    wait_for(lambda: "sites can join now" in processes.log("server") or server.poll() is not None, 120, "the SuperLink")
    return server, address, run


def start_client(
    processes: Processes, keyset: Path, address: str, k: int, tag: str = "", extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    return processes.start(
        f"client-{k}{tag}",
        *("client", "--superlink", address, "--root-cert", str(keyset / "keys" / "ca.pem")),
        *("--auth-key", str(keyset / "keys" / "nodes" / f"node-{k}.key"), "--preset", "tiny", *extra),
    )


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


SUPERNODE = b"fedtune.deploy.supernode"  # the SuperNode's module (Flower's flower-supernode, its pause capped)


def runs_supernode(pid: int) -> bool:
    """Whether ``pid`` has started its flower-supernode (which lives in its own session)."""
    for child in children(pid):
        with contextlib.suppress(OSError):
            if SUPERNODE in Path(f"/proc/{child}/cmdline").read_bytes():
                return True
    return False


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of ``root`` and the name of its program (Linux ``/proc``)."""
    found: dict[int, str] = {}
    queue = [root]
    while queue:
        for child in children(queue.pop()):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                names = [Path(a.decode()).name for a in argv[:2] if a]
                if SUPERNODE in argv:  # Flower's SuperNode, run through fedtune.deploy.supernode
                    names = ["flower-supernode"]
                if names:  # an exiting process (a zombie) has an empty command line
                    found[child] = next((n for n in names if n.startswith(("flower-", "flwr-"))), names[0])
                    queue.append(child)
    return found


def node_id(log: str) -> int:
    return int(log.split("SuperNode ID: ", 1)[1].split()[0])


def test_a_hanging_site_and_a_site_lost_mid_round_are_recorded_and_both_rejoin(
    processes: Processes, tmp_path: Path, keyset: Path
) -> None:
    # Prepare: three sites; sites 2 and 3 are frozen (SIGSTOP to `fedtune client` and its site
    # worker, which share a process group) once their SuperNodes are started, so neither can
    # answer round 1 whenever its message arrives, while their SuperNodes stay connected.
    server, address, run = start_federation(
        processes,
        keyset,
        tmp_path,
        *("--rounds", "2", "--set", "server.min-clients=3", "--set", "server.min-replies=1"),
        *("--set", "eval.federated=false"),
        # round 1 is waited out for the hung site: 20 s leaves site 1 (about 6 s here) room on a loaded
        # machine; round 2 must hear from all three, the restarted site 3 included, so it gets longer
        *("--set", "server.round-timeout=20", "--set", "plan.2.server.round-timeout=60"),
    )
    sites = {k: start_client(processes, keyset, address, k) for k in (1, 2, 3)}
    for k in (2, 3):
        wait_for(lambda k=k: runs_supernode(sites[k].pid) or sites[k].poll() is not None, 120, f"site {k}")  # type: ignore[misc]
        os.killpg(sites[k].pid, signal.SIGSTOP)

    # Execute: during round 1, site 3 goes away (SIGTERM; it handles it once continued) and comes
    # back; site 2 hangs through the round timeout and is continued after round 1.
    wait_for(lambda: len(rows_of(run)) >= 1, 240, "round 0")
    for sig in (signal.SIGTERM, signal.SIGCONT):
        os.killpg(sites[3].pid, sig)
    sites[3].wait(timeout=60)
    start_client(processes, keyset, address, 3, tag="-again")
    wait_for(lambda: len(rows_of(run)) >= 2, 240, "round 1")
    os.killpg(sites[2].pid, signal.SIGCONT)
    assert server.wait(timeout=400) == 0, processes.log("server")[-3000:]

    # Assert: round 1 went on with site 1 and recorded both others by node id; both rejoined
    rows = rows_of(run)
    hung, lost = node_id(processes.log("client-2")), node_id(processes.log("client-3"))
    first = rows[1]
    assert (first["replied"], first["failed"], first["updated"]) == (1, 2, True), first
    reasons = {f["node"]: f["reason"] for f in first["failures"]}  # type: ignore[attr-defined]
    assert reasons.keys() == {hung, lost}, (reasons, hung, lost)
    assert "round-timeout" in reasons[hung] or "site worker" in reasons[hung], reasons
    assert "Node Unavailable" in reasons[lost] or "round-timeout" in reasons[lost], reasons
    assert {hung, lost} <= set(rows[2]["replied_nodes"]), rows[2]  # type: ignore[call-overload]


def test_server_killed_after_round_1_resumes_and_equals_an_uninterrupted_run(
    processes: Processes, tmp_path: Path, keyset: Path, tiny_model: Path
) -> None:
    # Prepare
    extra = ("--rounds", "3", "--seed", "4", "--set", "server.min-clients=3", "--set", "eval.federated=false")
    server, address, run = start_federation(processes, keyset, tmp_path, *extra)
    for k in (1, 2, 3):
        start_client(processes, keyset, address, k)
    wait_for(lambda: len(rows_of(run)) >= 2, 300, "round 1")

    # Execute: `fedtune server` dies by SIGKILL (no clean-up of its own), which must take down
    # the SuperLink, its SuperExec and the ServerApp, each in a process group of its own
    flower = descendants(int((run / "superlink.pid").read_text()))
    assert {"flower-superlink", "flower-superexec", "flwr-serverapp"} <= set(flower.values()), flower
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)
    wait_for(lambda: not any(alive(p) for p in flower), 30, f"Flower's processes to die: {flower}")
    done = len(rows_of(run)) - 1
    # a SuperLink left over from an earlier crash is named (a bare one here, on a port of its own:
    # on the run's port the sites, which use TLS, would connect to it and give up)
    leftover = subprocess.Popen(  # supervised, so that stopping it stops the SuperExec it starts
        procs.supervised(
            [
                *(str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--database", ":memory:"),
                *("--port", str(free_port())),
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=procs.env(ENV),  # the venv's bin on PATH: the SuperLink starts flower-superexec from there
        start_new_session=True,
    )
    processes.started.append(leftover)
    (run / "superlink.pid").write_text(f"{leftover.pid}\n")
    refused = processes.start("refused", "server", "--resume", str(run), "--keys", str(keyset / "keys"))
    assert refused.wait(timeout=120) == 1
    assert processes.log("refused").strip().splitlines()[-1] == (
        f"fedtune: error: a SuperLink of an earlier server of {run} is still running "
        f"(pid {leftover.pid}, from {run / 'superlink.pid'}); stop it with `kill -- -{leftover.pid}` and start again."
    )
    os.killpg(leftover.pid, signal.SIGTERM)
    leftover.wait(timeout=30)
    # resuming without --address reuses the run's own (the dry run shows it), and finishes the run
    dry = processes.start("dry", "server", "--resume", str(run), "--keys", str(keyset / "keys"), "--dry-run")
    assert dry.wait(timeout=120) == 0 and f"--port {address.rsplit(':', 1)[1]}" in processes.log("dry")
    resumed = processes.start("server-resumed", "server", "--resume", str(run), "--keys", str(keyset / "keys"))
    assert resumed.wait(timeout=400) == 0, processes.log("server-resumed")[-3000:]

    # Assert: it resumed mid-run; every round once in metrics.jsonl, and the adapter of an
    # uninterrupted run of the same plan (computed in-process with the shared backend, which gives
    # the same numbers)
    assert 1 <= done < 3, f"the server should die mid-run, but it had finished {done} of 3 rounds"
    assert [r["round"] for r in rows_of(run)] == [0, 1, 2, 3]
    # each site logged that the run finished, under the run id Flower gave its messages
    flower_run = json.loads((run / "summary.json").read_text())["flower_run_id"]
    for k in (1, 2, 3):
        wait_for(lambda k=k: "fedtune client: run " in processes.log(f"client-{k}"), 30, f"site {k}'s line")  # type: ignore[misc]
        log = processes.log(f"client-{k}")
        assert f"[RUN {flower_run}, ROUND 3]" in log and f"fedtune client: run {flower_run} finished" in log, k
    from safetensors.numpy import load_file

    from fedtune.client.app import app as client_app
    from fedtune.config.plan import Plan
    from fedtune.server.app import run_server
    from fedtune.server.checkpoint import saved_plan
    from fedtune.simulations.local import LocalGrid

    plan = Plan.from_flat({**saved_plan(run), "output.dir": str(tmp_path / "straight"), "output.resume": False})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the deployed processes (ENV)
    try:
        run_server(plan, LocalGrid(client_app, 3))
    finally:
        torch.set_num_threads(threads)
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed_adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for key, value in straight.items():
        assert abs(resumed_adapter[key] - value).max() <= 1e-6, key


def test_a_late_registered_site_joins_sigterm_stops_cleanly_and_a_replaced_superlink_is_named(
    processes: Processes, tmp_path: Path
) -> None:
    # Prepare: two sites; the server's key directory lacks site 2's public key, which the
    # operator registers by hand while site 2 is already waiting (the startup race, slowed down)
    keys = tmp_path / "keys"
    make_keys(keys, 2, ["localhost", "127.0.0.1"])
    late = (keys / "nodes" / "node-2.pub").rename(tmp_path / "node-2.pub")
    keyset = tmp_path  # start_client reads keyset/keys
    server, address, run = start_federation(
        processes,
        keyset,
        tmp_path,
        *("--rounds", "2", "--set", "server.min-clients=2", "--set", "eval.federated=false"),
    )
    sites = {k: start_client(processes, keyset, address, k) for k in (1, 2)}
    wait_for(lambda: "not registered at the SuperLink yet" in processes.log("client-2"), 120, "site 2 to wait")
    register = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "supernode", "register", str(late), "fedtune"],
        env={**ENV, "FLWR_HOME": str(run / ".flwr")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "registered successfully" in register.stdout + register.stderr, register

    # Execute: once both sites are in (round 0 needs `server.min-clients` = 2), SIGTERM the server
    wait_for(lambda: len(rows_of(run)) >= 1 or server.poll() is not None, 300, "round 0")
    flower = descendants(int((run / "superlink.pid").read_text()))
    os.killpg(server.pid, signal.SIGTERM)
    status = server.wait(timeout=60)
    # then a new server run (its own database) comes up at the same address, and no site joins it
    replaced = processes.start(
        "server-new",
        *("server", "--keys", str(keys), "--preset", "tiny", "--out", str(tmp_path / "new"), "--address", address),
        *("--set", "server.min-clients=2", "--set", "server.wait-for-clients=40"),
    )
    site_status = {k: site.wait(timeout=240) for k, site in sites.items()}
    assert replaced.wait(timeout=240) == 1, processes.log("server-new")[-3000:]

    # Assert: SIGTERM is a clean stop: 143, round 0's checkpoint kept, every Flower process gone
    assert status == 128 + signal.SIGTERM, processes.log("server")[-3000:]
    assert (run / "checkpoints" / "round-000" / "state.json").is_file()
    assert not any(alive(p) for p in flower), flower
    # the sites met the new SuperLink: one line saying it does not know them, non-zero status
    for k in (1, 2):
        last = processes.log(f"client-{k}").strip().splitlines()[-1]
        assert site_status[k] == 1 and "no longer knows this node" in last, (k, site_status[k], last)
    # the new server's last line is the real cause, and no traceback was shown
    shown = processes.log("server-new")
    assert shown.strip().splitlines()[-1] == (
        "fedtune: error: only 0 of `server.min-clients` = 2 clients connected within `server.wait-for-clients` = 40 s."
    ), shown[-3000:]
    assert "Traceback" not in shown
