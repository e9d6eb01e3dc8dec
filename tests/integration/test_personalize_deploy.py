"""FedSA-LoRA deployed on 127.0.0.1: the server and every site die after round 1 and come back (the
server resumes, each site restarts with its state dir); the sites continue with their own B, so the
run ends exactly where an uninterrupted in-process run of the same plan ends."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedtune.deploy.keys import make_keys
from tests.integration.test_deploy import Processes, rows_of, start_federation, wait_for


@pytest.fixture
def keyset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keyset")
    make_keys(root / "keys", 3, ["localhost", "127.0.0.1"])
    return root


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def start_site(
    processes: Processes, keyset: Path, address: str, k: int, root: Path, tag: str
) -> subprocess.Popen[bytes]:
    keys = keyset / "keys"
    return processes.start(
        f"client-{k}{tag}",
        *("client", "--superlink", address, "--root-cert", str(keys / "ca.pem"), "--preset", "tiny"),
        *("--auth-key", str(keys / "nodes" / f"node-{k}.key")),
        *("--state-dir", str(root / f"state-{k}"), "--out", str(root / f"out-{k}")),
    )


ADAPTER_FILE = "adapter_model.safetensors"


def test_fedsa_sites_restarted_mid_run_continue_with_their_own_b(
    processes: Processes, tmp_path: Path, keyset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    extra = ("--rounds", "3", "--seed", "4", "--set", "server.min-clients=3", "--set", "lora.share=a")
    server, address, run = start_federation(processes, keyset, tmp_path, *extra, "--set", "eval.federated=true")
    sites = {k: start_site(processes, keyset, address, k, tmp_path, "") for k in (1, 2, 3)}
    wait_for(lambda: len(rows_of(run)) >= 2, 300, "round 1")

    # Execute: the server host dies (no clean-up) and every site process stops (its SuperNode and site
    # worker with it, so its context state is gone); the server resumes and the sites start again
    os.killpg(server.pid, signal.SIGKILL)
    os.killpg(int((run / "superlink.pid").read_text()), signal.SIGKILL)
    server.wait(timeout=30)
    for proc in sites.values():
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in sites.values():
        proc.wait(timeout=60)
    done = len(rows_of(run)) - 1
    resumed = processes.start(
        "server-resumed", "server", "--resume", str(run), "--keys", str(keyset / "keys"), "--address", address
    )
    joinable = "sites can join now"
    wait_for(lambda: joinable in processes.log("server-resumed") or resumed.poll() is not None, 120, "resume")
    for k in (1, 2, 3):
        start_site(processes, keyset, address, k, tmp_path, "-again")
    assert resumed.wait(timeout=400) == 0, processes.log("server-resumed")[-3000:]

    # Assert: the final global A and each site's personal adapter equal an uninterrupted run's
    assert 1 <= done < 3, f"the server should die mid-run, but it had finished {done} of 3 rounds"
    assert all(row["replied"] == 3 for row in rows_of(run)[1:]), rows_of(run)
    from fedtune.client.app import app as client_app
    from fedtune.config.plan import Plan
    from fedtune.server.app import run_server
    from fedtune.server.checkpoint import saved_plan
    from fedtune.simulations.local import LocalGrid

    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))
    plan = Plan.from_flat({**saved_plan(run), "output.dir": str(tmp_path / "straight"), "output.resume": False})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the deployed processes
    try:
        run_server(plan, LocalGrid(client_app, 3))
    finally:
        torch.set_num_threads(threads)
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    deployed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(".lora_A." in k for k in straight)
    for key, value in straight.items():
        assert np.abs(deployed[key] - value).max() <= 1e-6, key
    for k in (1, 2, 3):
        mine = load_file(str(tmp_path / f"out-{k}" / "adapter" / "adapter_model.safetensors"))
        ref = load_file(str(tmp_path / "straight" / "sites" / f"site-{k - 1}" / "adapter" / ADAPTER_FILE))
        assert any(".lora_B." in key and value.any() for key, value in ref.items())
        for key, value in ref.items():
            assert np.abs(mine[key] - value).max() <= 1e-6, (k, key)
