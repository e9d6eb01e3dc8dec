"""`train.num-threads = 0` (auto): the cores a process may use, divided by fedtune's training
processes on the machine, chosen and logged once per site (CLI runs with a restricted CPU affinity)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import CliRun

FEDTUNE = [sys.executable, "-m", "fedtune.cli"]
CHOOSE = """
import os, sys, torch
from fedtune.model import threads
threads.apply(0, ranks=int(sys.argv[1]))
print(torch.get_num_threads())
"""


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment without a thread cap (OMP_NUM_THREADS caps the automatic choice)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "FEDTUNE_TRAINING_PROCESSES")}
    return {**env, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", **extra}


def _pinned(cores: set[int]) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, cores)


def _cores(n: int) -> set[int]:
    return set(sorted(os.sched_getaffinity(0))[:n])


@pytest.mark.parametrize(("cores", "processes", "ranks"), [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 1, 2), (2, 3, 1)])
def test_auto_divides_the_allowed_cores_among_the_training_processes(cores: int, processes: int, ranks: int) -> None:
    # Prepare: a process allowed `cores` cores, told that `processes` train at once on the machine
    allowed = _cores(cores)
    expected = max(1, len(allowed) // (processes * ranks))

    # Execute: the automatic choice, as torch reports it afterwards
    out = subprocess.run(
        [sys.executable, "-c", CHOOSE, str(ranks)],
        capture_output=True,
        text=True,
        env=_env(FEDTUNE_TRAINING_PROCESSES=str(processes)),
        preexec_fn=_pinned(allowed),
        check=True,
    ).stdout

    # Assert
    assert int(out.strip()) == expected


def test_omp_num_threads_caps_the_automatic_choice() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHOOSE, "1"],
        capture_output=True,
        text=True,
        env=_env(OMP_NUM_THREADS="1"),
        preexec_fn=_pinned(_cores(2)),
        check=True,
    ).stdout
    assert int(out.strip()) == 1


def test_a_shared_simulation_logs_each_sites_threads_once(tmp_path: Path) -> None:
    # Prepare: the shared backend runs every site in its one process, on every core it may use
    allowed = _cores(2)

    # Execute
    args = ["simulate", "--preset", "tiny", "--out", str(tmp_path / "run"), "--rounds", "1", "--clients", "2"]
    proc = subprocess.run(
        [*FEDTUNE, *args, "--set", "simulation.backend=shared"],
        capture_output=True,
        text=True,
        env=_env(),
        preexec_fn=_pinned(allowed),
        timeout=300,
    )

    # Assert: one line per site, with all the allowed cores for its one training process
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"^site (\d): (\d+) torch thread\(s\) \((.*)\)$", proc.stdout + proc.stderr, re.M)
    assert sorted(site for site, _, _ in lines) == ["0", "1"], (proc.stdout + proc.stderr)[-3000:]
    assert {int(n) for _, n, _ in lines} == {len(allowed)}
    assert all(f"{len(allowed)} usable core(s) / 1 training process(es)" in why for _, _, why in lines)


def test_a_server_beside_its_clients_counts_itself_as_one_more_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.model import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [threads.beside(k).threads for k in (1, 2, 3, 15, 16)] == [8, 5, 4, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.beside(1).threads == 2 and "capped by OMP_NUM_THREADS" in threads.beside(1).reason


def test_a_ray_simulations_server_leaves_the_cores_to_its_clients(tiny_ray_run: Callable[[str], CliRun]) -> None:
    # Prepare: the shared tiny Ray run (3 sites, federated evaluation on, 1 CPU per client), made on
    # this machine with this process's cores
    run = tiny_ray_run("b")
    cores = len(os.sched_getaffinity(0))
    clients = min(3, cores)  # Ray runs as many clients at once as it has CPUs, at most the 3 sites

    # Execute
    found = re.findall(
        r"^the server: (\d+) torch thread\(s\) \(auto: (\d+) usable core\(s\) / \((\d+) concurrent client",
        run.stdout + run.stderr,
        re.M,
    )

    # Assert: the server's centralized evaluation overlaps with the clients' federated evaluation, so
    # it takes one share of the cores as one more process, not torch's default of every core
    assert run.returncode == 0, run.stderr[-3000:]
    assert found == [(str(max(1, cores // (clients + 1))), str(cores), str(clients))], (run.stdout + run.stderr)[-3000:]


@pytest.mark.parametrize(("superlink", "announced"), [("127.0.0.1:9092", "3"), ("10.1.2.3:9092", None)])
def test_a_loopback_demo_federation_shares_the_cores_among_its_sites(
    tmp_path: Path, superlink: str, announced: str | None
) -> None:
    # Prepare: site 1 of the tiny demo's 3 sites, whose SuperLink is on this machine (or not)
    key = tmp_path / "node-1.key"
    key.write_text("unused by --dry-run\n")

    # Execute
    args = ["client", "--superlink", superlink, "--insecure", "--auth-key", str(key), "--preset", "tiny"]
    proc = subprocess.run(
        [*FEDTUNE, *args, "--dry-run"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )

    # Assert: the site worker and the SuperNode are started knowing that 3 sites share the machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(r"FEDTUNE_TRAINING_PROCESSES=(\d+)", proc.stdout)
    assert found == ([announced] * 2 if announced else []), proc.stdout
