"""`simulation.ray-address`: a simulation on a real two-node Ray cluster (both nodes on this machine),
and the default that never joins a running cluster, even one that ``RAY_ADDRESS`` names.

The cluster is started with ``ray start`` (a head and a worker node, one CPU each, in a private
temp dir) and every process it started is stopped by process id afterwards (``ray stop`` would stop
every Ray on the machine, other users' included). Which node ran which client comes from the
cluster's GCS actor table (what Ray's state API reads; ``ray.util.state`` itself needs the
dashboard of ``ray[default]``), matched to the pids of the cluster's worker logs that show a
site's training.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from safetensors.numpy import load_file

RAY = str(Path(sys.executable).with_name("ray"))
TRAINED = re.compile(r"site \d+ round 1: 100%")
RUN = ("--preset", "tiny", "--rounds", "1", "--clients", "2", "--seed", "5")


@dataclass(frozen=True)
class Cluster:
    address: str
    temp_dir: Path

    def worker_logs(self) -> list[Path]:
        return sorted(self.temp_dir.glob("session_*/logs/worker-*.out")) + sorted(
            self.temp_dir.glob("session_*/logs/worker-*.err")
        )

    def driver_logs(self) -> set[str]:
        """The drivers that ever connected to this cluster (Ray writes one log per driver)."""
        return {p.name for p in self.temp_dir.glob("session_*/logs/python-core-driver-*")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_ports() -> list[str]:
    """Ports of one node's side processes: two nodes on one machine must not share Ray's defaults."""
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port")
    return [f"{flag}={free_port()}" for flag in (*flags, "--runtime-env-agent-port")]


def ray_start(*args: str, temp_dir: Path) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [RAY, "start", "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats", *node_ports(), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def started_in(temp_dir: Path) -> list[psutil.Process]:
    """Every process of the cluster in ``temp_dir`` (its daemons name the dir) and their children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if str(temp_dir) in " ".join(proc.info["cmdline"] or []):
            for p in [proc, *proc.children(recursive=True)]:
                found[p.pid] = p
    return list(found.values())


def stop(procs: list[psutil.Process]) -> None:
    """Stop exactly these processes: SIGTERM, then SIGKILL what is left after 5 s."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=15)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp_dir = Path(tempfile.mkdtemp(prefix="ftr-", dir="/tmp"))  # short: Ray's socket paths must fit
    address = f"127.0.0.1:{free_port()}"
    try:
        ray_start("--head", f"--port={address.split(':')[1]}", "--include-dashboard=false", temp_dir=temp_dir)
        ray_start(f"--address={address}", temp_dir=temp_dir)
        yield Cluster(address, temp_dir)
    finally:
        started = started_in(temp_dir)
        stop(started)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert started and not left


def simulate(out: Path, *sets: str, env: dict[str, str] | None = None) -> None:
    """`fedtune simulate` as a user runs it, on the tiny preset (1 round, 2 sites)."""
    args = [arg for s in sets for arg in ("--set", s)]
    full = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", *RUN, "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full)
    assert proc.returncode == 0, proc.stderr[-3000:]


ACTORS = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = {a["Pid"]: a["Address"]["NodeID"] for a in state.actors().values() if a["ActorClassName"] == "ClientAppActor"}
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def actors_by_node(address: str) -> tuple[list[str], dict[int, str]]:
    """The cluster's live nodes, and the node of each client actor it ever ran (by pid)."""
    proc = subprocess.run([sys.executable, "-c", ACTORS, address], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return found["nodes"], {int(pid): node for pid, node in found["actors"].items()}


def adapter(out: Path) -> dict[str, object]:
    return dict(load_file(str(out / "adapter" / "adapter_model.safetensors")))


def test_a_two_node_cluster_runs_clients_on_both_nodes_and_the_default_starts_its_own_ray_with_its_result(
    cluster: Cluster, tmp_path: Path
) -> None:
    """One test, so that the cluster and its run are made once: xdist's worksteal may hand a module's
    tests to two workers, and each would start its own cluster and run."""
    # Execute: a simulation attached to the cluster
    on_cluster = tmp_path / "cluster"
    simulate(on_cluster, f"simulation.ray-address={cluster.address}")

    # Prepare: the pids of the cluster's workers that trained a site (Ray logs each worker's
    # stdout and stderr to the cluster's session dir as worker-<id>-<job>-<pid>.out/.err; the progress bar,
    # which fedtune prints to stdout, is there)
    pids = {
        int(p.stem.rsplit("-", 1)[1]) for p in cluster.worker_logs() if TRAINED.search(p.read_text(errors="replace"))
    }

    # Execute
    nodes, actor_node = actors_by_node(cluster.address)

    # Assert: two nodes, and a client trained on each of them
    assert len(nodes) == 2
    assert pids and pids <= actor_node.keys(), (pids, actor_node)
    assert {actor_node[pid] for pid in pids} == set(nodes)
    assert (on_cluster / "summary.json").is_file()

    # Prepare: the running cluster that RAY_ADDRESS names, as `ray start` tells users to export
    drivers = cluster.driver_logs()

    # Execute: the default `simulation.ray-address` (empty)
    simulate(tmp_path / "local", env={"RAY_ADDRESS": cluster.address})

    # Assert: no new driver joined the cluster, and the same seed gave the same adapter
    assert cluster.driver_logs() == drivers and drivers  # the attached run did leave its driver there
    local, attached = adapter(tmp_path / "local"), adapter(on_cluster)
    assert local.keys() == attached.keys() and local
    for key in local:
        assert abs(local[key] - attached[key]).max() <= 1e-6, key  # type: ignore[operator]
