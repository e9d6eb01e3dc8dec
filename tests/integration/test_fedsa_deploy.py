"""FedSA-LoRA (``lora.share = a``) deployed: `fedtune server` and two `fedtune client` sites with real
SuperNodes on loopback (the helpers and the key set of ``test_deploy``). One site is killed (SIGKILL)
after it has trained, restarted with the same key and ``--state-dir``, and continues with its own B."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from tests.integration import test_deploy as deploy
from tests.integration.test_deploy import Processes, alive, descendants, node_id, rows_of, start_client, wait_for

keyset = deploy.keyset  # the fixtures of the deploy tests
processes = deploy.processes
ROUNDS = 3
FIRST_STEPS, STEPS = 24, 2  # round 1 builds a large B; every later round moves it a little


def collect(state_dir: Path, seen: dict[int, dict[str, np.ndarray]]) -> bool:
    """Copy each round's own-B file in ``state_dir`` the first time it is there (the site keeps only its
    last two rounds); always False, to poll with :func:`wait_for`."""
    for path in state_dir.glob("*.personal-r*.safetensors"):
        rnd = int(re.fullmatch(r".*\.personal-r(\d+)\.safetensors", path.name).group(1))  # type: ignore[union-attr]
        if rnd not in seen:
            with contextlib.suppress(FileNotFoundError, SafetensorError):  # dropped since the listing
                seen[rnd] = load_file(str(path))
    return False


def norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in arrays.values())))


def test_a_killed_fedsa_site_restarted_with_its_state_dir_continues_with_its_own_b(
    processes: Processes, tmp_path: Path, keyset: Path
) -> None:
    # Prepare: two sites, each with its own state dir and output dir; only the last round evaluates
    # at the sites (where each writes its personal adapter). A round that loses a site goes on with
    # the other (`server.min-replies` = 1) after `server.round-timeout`.
    server, address, run = deploy.start_federation(
        processes,
        keyset,
        tmp_path,
        *("--rounds", str(ROUNDS), "--set", "lora.share=a", "--set", "server.min-clients=2"),
        *("--set", "server.min-replies=1", "--set", "server.round-timeout=30"),
        *("--set", f"train.local-steps={STEPS}", "--set", f"plan.1.train.local-steps={FIRST_STEPS}"),
        *("--set", "eval.federated=false", "--set", f"plan.{ROUNDS}.eval.federated=true"),
    )
    site = {k: tmp_path / f"site-{k}" for k in (1, 2)}
    flags = {k: ("--state-dir", str(site[k] / "state"), "--out", str(site[k] / "out")) for k in (1, 2)}
    sites = {k: start_client(processes, keyset, address, k, extra=flags[k]) for k in (1, 2)}
    state = site[2] / "state"

    # Execute: once round 1 is done and site 2 has kept its B, SIGKILL site 2 (`fedtune client` and its
    # site worker, a process group; its SuperNode goes with them), then restart it as it was
    wait_for(
        lambda: (len(rows_of(run)) >= 2 and any(state.glob("*.personal-r*"))) or server.poll() is not None,
        300,
        "round 1",
    )
    assert server.poll() is None, processes.log("server")[-3000:]
    flower = descendants(sites[2].pid)
    assert "flower-supernode" in flower.values(), flower
    os.killpg(sites[2].pid, signal.SIGKILL)
    sites[2].wait(timeout=30)
    wait_for(lambda: not any(alive(p) for p in flower), 30, f"site 2's processes to die: {flower}")
    before: dict[int, dict[str, np.ndarray]] = {}
    collect(state, before)
    k = max(before)  # the B the restarted site must continue from
    start_client(processes, keyset, address, 2, tag="-again", extra=flags[2])
    after: dict[int, dict[str, np.ndarray]] = {}
    wait_for(lambda: collect(state, after) or server.poll() is not None, 400, "the run")
    assert server.wait(timeout=30) == 0, processes.log("server")[-3000:]
    collect(state, after)

    # Assert: the run finished every round; the restarted site (same node id) trained again
    rows = rows_of(run)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    node = node_id(processes.log("client-2"))
    assert node_id(processes.log("client-2-again")) == node
    again = [r["round"] for r in rows[1:] if node in r["replied_nodes"] and r["round"] > k]  # type: ignore[operator]
    assert again and again[-1] == ROUNDS, rows
    # the first B it trained after the restart (round k + j) is B_k plus one small round's update:
    # from zeros it would be that small update alone, and ||B_next - B_k|| about ||B_k||
    nxt = min(r for r in after if r > k)
    b_k, b_next = before[k], after[nxt]
    assert sorted(b_next) == sorted(b_k) and all(".lora_B." in key for key in b_k)
    moved = norm({key: b_next[key] - b_k[key] for key in b_k})
    assert 0 < moved < 0.5 * norm(b_k), (k, nxt, moved, norm(b_k))
    # the global adapter holds the aggregated A and the initial B (zeros)
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    initial = load_file(str(run / "checkpoints" / "round-000" / "adapter" / "adapter_model.safetensors"))
    assert sorted(final) == sorted(initial)
    assert all(not final[key].any() for key in final if ".lora_B." in key)
    assert any(not np.array_equal(final[key], initial[key]) for key in final if ".lora_A." in key)
    # site 2's personal adapter: (final global A, its own B of the last round), a vanilla PEFT folder
    folder = site[2] / "out" / "adapter"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(final)
    for key, value in saved.items():
        np.testing.assert_array_equal(value, final[key] if ".lora_A." in key else after[ROUNDS][key])
    config = json.loads((folder / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), str(folder)
    )
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # site 1's personal adapter has the same A and a B of its own
    other = load_file(str(site[1] / "out" / "adapter" / "adapter_model.safetensors"))
    assert all(np.array_equal(other[key], final[key]) for key in final if ".lora_A." in key)
    assert any(not np.array_equal(other[key], saved[key]) for key in final if ".lora_B." in key)
