"""A tiny federation through Flower's real simulation engine (Ray), checked from its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from fedtune.config import RunConfig
from fedtune.model.adapters import load_adapter_arrays, wrap_lora
from fedtune.model.loading import load_base
from tests.conftest import CliRun

FIELDS = {
    "round",
    "sampled",
    "replied",
    "failed",
    "train_loss",
    "eval_loss",
    "bytes_up",
    "bytes_down",
    "seconds",
}


def fedtune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI the way a user does."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def run_dir(tiny_ray_run: Callable[[str], CliRun]) -> Path:
    """The tiny Ray run "a" (tests/conftest.py: 2 rounds, 3 sites, seed 3)."""
    run = tiny_ray_run("a")
    assert run.returncode == 0, run.stderr[-3000:]
    return run.out


def test_outputs_exist_with_the_documented_fields(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(set(r) >= FIELDS for r in rows)
    assert all(r["sampled"] == 3 and r["replied"] == 3 and r["failed"] == 0 for r in rows[1:])
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[-1]["eval_loss_federated"] is not None and rows[-1]["eval_loss_central"] is not None
    for rnd in (0, 1, 2):
        assert (run_dir / "checkpoints" / f"round-{rnd:03d}" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["num-server-rounds"] == 2 and "sample" in summary
    assert (run_dir / "rounds.md").read_text().count("\n") == 2 + 3
    assert not list(run_dir.rglob(".*tmp*"))


def test_final_adapter_is_vanilla_peft_and_matches_fedtune_model(run_dir: Path) -> None:
    # Prepare: fedtune's model with the final global adapter, as the server holds it in memory
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    cfg = RunConfig.from_flat(json.loads((run_dir / "summary.json").read_text())["config"])
    loaded = load_base(cfg.model, torch.device("cpu"))
    ours = wrap_lora(loaded, cfg.lora)
    load_adapter_arrays(
        ours, load_file(str(run_dir / "checkpoints" / "round-002" / "adapter" / "adapter_model.safetensors"))
    )
    ids = torch.tensor([[3, 50, 120, 77, 9, 200, 31]])

    # Execute
    vanilla = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), str(run_dir / "adapter")
    )
    with torch.no_grad():
        a = ours.eval()(input_ids=ids).logits
        b = vanilla.eval()(input_ids=ids).logits

    # Assert
    assert config["base_model_name_or_path"] == str(run_dir / "base-model")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lora_b = [p for n, p in vanilla.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_same_seed_gives_the_same_adapter(run_dir: Path, tiny_ray_run: Callable[[str], CliRun]) -> None:
    # Execute: a second run of the same settings and seed (the run test_readable_output reads)
    again = tiny_ray_run("b")

    # Assert
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.out != run_dir
    first = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    second = load_file(str(again.out / "adapter" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        assert abs(first[key] - second[key]).max() <= 1e-6, key


def test_shared_backend_gives_the_ray_backends_adapter(run_dir: Path, tmp_path: Path) -> None:
    # Prepare: the Ray run's settings and base model, on the in-process backend. Ray runs each site
    # with train.num-threads = simulation.num-cpus = 1; the shared run pins the same thread count
    cfg = json.loads((run_dir / "summary.json").read_text())["config"]

    # Execute
    proc = fedtune(
        *("simulate", "--preset", "tiny", "--out", str(tmp_path / "shared"), "--rounds", "2", "--clients", "3"),
        *("--seed", "3", "--set", "simulation.backend=shared", "--set", f"model.name={cfg['model.name']}"),
        *("--set", "train.num-threads=1", "--set", "eval.federated-every=0"),
    )

    # Assert: every saved PEFT tensor agrees to 1e-6 (evaluation, however often, changes no training)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ray = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    shared = load_file(str(tmp_path / "shared" / "adapter" / "adapter_model.safetensors"))
    assert ray.keys() == shared.keys()
    for key in ray:
        assert abs(ray[key] - shared[key]).max() <= 1e-6, key
    assert any(abs(ray[k]).max() > 0 for k in ray if "lora_B" in k)  # trained, not the zero init
    # eval.federated-every = 0: the sites evaluated the last round only, the server every round; the
    # Ray run (every round, the default) had the sites' scores in round 0 too
    rows = [json.loads(line) for line in (tmp_path / "shared" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("eval_loss_federated") is not None for r in rows] == [False, False, True]
    assert all(r.get("eval_loss_central") is not None for r in rows)
    assert [r.get("spec", {}).get("eval.federated") for r in rows[1:]] == [False, None]
    sites = json.loads((tmp_path / "shared" / "sites.json").read_text())
    assert len(sites["sites"]) == 3 and all(entry["eval"]["round"] == 2 for entry in sites["sites"].values())
    ray_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("eval_loss_federated") is not None for r in ray_rows)
