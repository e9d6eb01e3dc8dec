"""LoRA vs LoRA-SB (``peft.method = lora-sb``) at equal rank: bytes per round, trainable values, held-out
loss at equal rounds, without DP and under ``dp-sgd`` at one target epsilon.

Each row is one ``fedtune simulate`` (fresh process, the CLI a user runs) on the in-process ``shared``
backend with the same seed, rounds, local steps and rank; only ``peft.method`` and ``train.lr`` differ
(LoRA-SB trains r x r cores between fixed factors; its usual learning rate is higher, so it runs at
LoRA's and at a higher one). Ratios are against LoRA in the same run. Usage:

    python benchmarks/lora_sb.py [--preset tiny] [--rounds 3] [--local-steps 4] [--epsilon 8]
        [--out runs/bench-lora-sb] [--rows lora,lora-sb,lora-sb@x10,lora-sb@x10@r16] [--dp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config.presets import preset
from fedtune.server.outputs import read_checkpoint


def run_row(row: str, args: argparse.Namespace, dp: bool) -> dict[str, Any]:
    """One federation; ``row`` is ``method`` with optional ``@xF`` (learning rate F times the preset's) and
    ``@rN`` (``lora.r`` = N, alpha / r kept at the preset's)."""
    method, *tags = row.split("@")
    factor = next((float(t[1:]) for t in tags if t.startswith("x")), 1.0)
    lr = float(preset(args.preset).get("train.lr", 2e-3)) * factor
    out = Path(args.out) / f"{row}{'-dp' if dp else ''}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "fedtune.cli", "simulate", "--preset", args.preset, "--out", str(out),
        "--rounds", str(args.rounds), "--seed", "0",
        "--set", "simulation.backend=shared", "--set", "eval.federated=false",
        "--set", f"train.local-steps={args.local_steps}", "--set", f"peft.method={method}",
        "--set", f"train.lr={lr}",
    ]  # fmt: skip
    for rank in (int(t[1:]) for t in tags if t.startswith("r")):
        ratio = float(preset(args.preset).get("lora.alpha", 16)) / float(preset(args.preset).get("lora.r", 8))
        cmd += ["--set", f"lora.r={rank}", "--set", f"lora.alpha={int(ratio * rank)}"]
    if dp:
        cmd += ["--set", "privacy.mechanism=dp-sgd", "--set", f"privacy.target-epsilon={args.epsilon}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("fedtune: error:")]
        return {"row": row, "dp": dp, "refused": errors[-1] if errors else proc.stderr[-500:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] >= 1]
    state = read_checkpoint(out / "checkpoints" / "round-000")
    sent = [k for k in state if ".lora_sb_core." in k] or list(state)  # what a site trains and sends
    summary = json.loads((out / "summary.json").read_text())
    return {
        "row": row,
        "dp": dp,
        "lr": lr,
        "trainable": sum(int(np.prod(state[k].shape)) for k in sent),
        "up_per_client": trained[-1]["bytes_up"] / max(trained[-1]["replied"], 1),
        # round 1 carries LoRA-SB's fixed A and B to every site (eval.federated = false: nothing went before it),
        # later rounds the cores alone
        "down_first_per_client": trained[0]["bytes_down"] / max(trained[0]["sampled"], 1),
        "down_per_client": trained[-1]["bytes_down"] / max(trained[-1]["sampled"], 1),
        "eval_loss_0": rows[0]["eval_loss"],
        "eval_loss": rows[-1]["eval_loss"],
        "epsilon": summary.get("privacy", {}).get("epsilon"),
        "round_seconds": sum(r["seconds"] for r in trained) / len(trained),
        "seconds": seconds,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| row | dp-sgd | lr | trained and sent values | / LoRA | up per site per round | / LoRA "
        "| down per site, round 1 | down per site, later rounds | / LoRA | held-out loss, round 0 -> last "
        "| s per round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "refused" in r:
            lines.append(f"| {r['row']} | {r['dp']} | refused: {r['refused']} |||||||||")
            continue
        lora = next((x for x in results if x["row"] == "lora" and x["dp"] == r["dp"] and "refused" not in x), r)
        lines.append(
            f"| {r['row']} | {'yes' if r['dp'] else 'no'} | {r['lr']:g} | {r['trainable']:,} "
            f"| {r['trainable'] / lora['trainable']:.3g} | {r['up_per_client']:,.0f} B "
            f"| {r['up_per_client'] / lora['up_per_client']:.3g} | {r['down_first_per_client']:,.0f} B "
            f"| {r['down_per_client']:,.0f} B | {r['down_per_client'] / lora['down_per_client']:.3g} "
            f"| {r['eval_loss_0']:.4f} -> {r['eval_loss']:.4f} | {r['round_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--rows", default="lora,lora-sb,lora-sb@x10")
    parser.add_argument("--dp", action="store_true", help="also every row under dp-sgd at --epsilon")
    parser.add_argument("--out", default="runs/bench-lora-sb")
    args = parser.parse_args()
    results = []
    for dp in (False, True) if args.dp else (False,):
        for row in args.rows.split(","):
            results.append(run_row(row, args, dp))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
