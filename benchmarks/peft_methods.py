"""Every ``peft.method`` on the demo: trainable parameters, bytes per round per client, eval loss.

Each method runs the demo federation (``fedtune simulate --preset smollm2``: SmolLM2-135M-Instruct,
5 hospital sites, FedAvg) for the same rounds, local steps and seed, on the in-process ``shared``
backend, one fresh process per method, through the CLI a user runs. Centralized eval only (the
figure compared is the server's held-out loss). Each method keeps its own learning rate (the
usual order of magnitude for it; one lr for all would compare learning rates, not methods), and
the ratios are against LoRA in the same run. A method the model cannot take (bitfit on a model
without biases) gets a row with the refusal. Usage:

    python benchmarks/peft_methods.py [--rounds 2] [--local-steps 2] [--methods lora,ia3,...]
        [--out runs/bench-peft] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.server.outputs import read_checkpoint

LR = {
    "lora": 2e-3,  # the demo's default
    "ia3": 1e-2,
    "prompt-tuning": 3e-2,
    "prefix-tuning": 1e-2,
    "bitfit": 1e-3,
    "full": 5e-5,
}


def run_method(method: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One federation with ``method``; its figures, or the refusal line."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "fedtune.cli", "simulate", "--preset", "smollm2", "--out", str(out),
        "--rounds", str(args.rounds), "--seed", "0",
        "--set", "simulation.backend=shared", "--set", "eval.federated=false",
        "--set", f"train.local-steps={args.local_steps}", "--set", f"peft.method={method}",
        "--set", f"train.lr={LR[method]}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("fedtune: error:")]
        return {"method": method, "refused": errors[-1] if errors else proc.stderr[-500:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] >= 1]
    params = sum(int(np.prod(v.shape)) for v in read_checkpoint(out / "checkpoints" / "round-000").values())
    return {
        "method": method,
        "lr": LR[method],
        "trainable": params,
        "up_per_client": trained[-1]["bytes_up"] / max(trained[-1]["replied"], 1),
        "down_per_client": trained[-1]["bytes_down"] / max(trained[-1]["sampled"], 1),
        "eval_loss_0": rows[0]["eval_loss"],
        "eval_loss": rows[-1]["eval_loss"],
        "round_seconds": sum(r["seconds"] for r in trained) / len(trained),
        "seconds": seconds,
    }


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError


def table(results: list[dict[str, Any]]) -> str:
    lora = next(r for r in results if r["method"] == "lora" and "refused" not in r)
    lines = [
        "| method | lr | trainable params | / LoRA | up per client per round | / LoRA | eval loss (round 0 -> last) "
        "| / LoRA | s per round | / LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "refused" in r:
            lines.append(f"| {r['method']} | refused: {r['refused'].removeprefix('fedtune: error: ')} |||||||||")
            continue
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['trainable'] / lora['trainable']:.3g} "
            f"| {human(r['up_per_client'])} | {r['up_per_client'] / lora['up_per_client']:.3g} "
            f"| {r['eval_loss_0']:.4f} -> {r['eval_loss']:.4f} | {r['eval_loss'] / lora['eval_loss']:.3g} "
            f"| {r['round_seconds']:.0f} | {r['round_seconds'] / lora['round_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--methods", default="lora,ia3,prompt-tuning,prefix-tuning,bitfit,full")
    parser.add_argument("--out", default="runs/bench-peft")
    parser.add_argument("--jobs", type=int, default=1, help="methods run at once (seconds are then shared)")
    args = parser.parse_args()
    methods = args.methods.split(",")

    def one(method: str) -> dict[str, Any]:
        result = run_method(method, args, Path(args.out) / method)
        print(json.dumps(result), flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, methods))
    print(table(results))


if __name__ == "__main__":
    main()
