"""Issue 18's side-by-side table: personalization and LoRA-aware methods on the demo, same seed, rounds and steps.

Each row is one ``fedtune simulate --preset smollm2`` (SmolLM2-135M-Instruct, 5 hospital sites) through the CLI a
user runs, one fresh process per run, on the in-process ``shared`` backend, with federated evaluation on (each
site scores on its own held-out split) and loss-only evaluation (the table's columns are losses). Rows:

- ``lora``: FedAvg LoRA, the baseline;
- ``ffa``: FFA-LoRA (``lora.freeze-a = true``);
- ``rolora``: RoLoRA (``lora.alternate = true``);
- ``fedsa``: FedSA-LoRA (``lora.share = a``), two rows from one run: each site's personal adapter and the global one;
- ``local``: local adaptation (``personalize.local-steps``), the sites' personal adapters (its global adapter is
  the baseline's);
- ``lora-sb``: LoRA-SB (``peft.method = lora-sb``);
- ``exact``: ``strategy.name = exact``.

With ``--dp EPS`` every run adds ``privacy.mechanism = dp-sgd`` at ``privacy.target-epsilon = EPS`` (methods that do
not compose with it get their refusal line as the row). Columns: the server's final central held-out loss; each
site's own held-out loss (mean, worst, worst/best; a personal row scores the personal adapter); bytes up and down per
client per round (mean over the rounds, federated evaluation's messages included); trained values per round; seconds
per round (the ``seconds`` of ``metrics.jsonl``, evaluation included). Usage:

    python benchmarks/methods_table.py [--rounds 3] [--local-steps 3] [--rows lora,ffa,...] [--dp 8]
        [--out runs/bench-methods] [--set KEY=VALUE ...]
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

from fedtune.server.outputs import read_checkpoint

ROWS: dict[str, list[str]] = {
    "lora": [],
    "ffa": ["lora.freeze-a=true"],
    "rolora": ["lora.alternate=true"],
    "fedsa": ["lora.share=a"],
    "local": [],  # personalize.local-steps is set from --local-steps in run_row
    "lora-sb": ["peft.method=lora-sb"],
    "exact": ["strategy.name=exact"],
}
PERSONAL = {"fedsa", "local"}


def trained_values(row: str, arrays: dict[str, np.ndarray], rounds: int) -> float:
    """Values a site trains per round (mean over the rounds for RoLoRA, which alternates B and A)."""
    count = {part: sum(v.size for k, v in arrays.items() if part in k) for part in ("lora_A", "lora_B", "lora_sb_core")}
    if row == "lora-sb":
        return count["lora_sb_core"]
    if row == "ffa":
        return count["lora_B"]
    if row == "rolora":  # odd rounds B, even rounds A
        return sum(count["lora_B"] if r % 2 else count["lora_A"] for r in range(1, rounds + 1)) / rounds
    return count["lora_A"] + count["lora_B"]


def run_row(row: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One federation for ``row``; its figures, or the refusal line."""
    shutil.rmtree(out, ignore_errors=True)
    sets = [*ROWS[row], "simulation.backend=shared", "eval.metrics=loss", "eval.federated=true", *args.set]
    sets.append(f"train.local-steps={args.local_steps}")
    if row == "local":
        sets.append(f"personalize.local-steps={args.local_steps}")
    if args.dp is not None:
        sets += ["privacy.mechanism=dp-sgd", f"privacy.target-epsilon={args.dp}"]
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--preset", args.preset, "--out", str(out),
           "--rounds", str(args.rounds), "--seed", "0"]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("fedtune: error:")]
        return {"row": row, "refused": errors[-1] if errors else proc.stderr[-800:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] >= 1]
    sites = json.loads((out / "sites.json").read_text())["sites"]
    arrays = read_checkpoint(out / "checkpoints" / "round-000")
    summary = json.loads((out / "summary.json").read_text())
    common = {
        "central": rows[-1]["eval_loss_central"],
        "up": float(np.mean([r["bytes_up"] / max(r["replied"], 1) for r in trained])),
        "down": float(np.mean([r["bytes_down"] / max(r["sampled"], 1) for r in trained])),
        "trained": trained_values(row, arrays, args.rounds),
        "round_seconds": float(np.mean([r["seconds"] for r in trained])),
        "wall": seconds,
        "epsilon": summary.get("privacy", {}).get("epsilon"),
    }
    results = []
    kinds = ["personal", "global"] if row == "fedsa" else ["personal"] if row == "local" else ["global"]
    for kind in kinds:
        key = "personal_eval_loss" if kind == "personal" else "eval_loss"
        losses = [float(s["eval"][key]) for s in sites.values()]
        name = f"{row} ({kind})" if row in PERSONAL else row
        results.append({"row": name, **common, "mean": float(np.mean(losses)), "worst": max(losses),
                        "best": min(losses), "sites": losses})  # fmt: skip
    return {"row": row, "results": results}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| method | central held-out loss | sites' own loss: mean | worst | worst/best | worst / LoRA's worst "
        "| mean / LoRA's mean | up per client per round | down | trained values per round | s per round |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    flat = [r for run in runs for r in run.get("results", [])]
    base = next((r for r in flat if r["row"] == "lora"), None)
    for run in runs:
        if "refused" in run:
            lines.append(f"| {run['row']} | refused: {run['refused'].removeprefix('fedtune: error: ')} ||||||||||")
            continue
        for r in run["results"]:
            worst = f"{r['worst'] / base['worst']:.3f}" if base else "-"
            mean = f"{r['mean'] / base['mean']:.3f}" if base else "-"
            lines.append(
                f"| {r['row']} | {r['central']:.4f} | {r['mean']:.4f} | {r['worst']:.4f} "
                f"| {r['worst'] / r['best']:.2f} | {worst} | {mean} | {human(r['up'])} | {human(r['down'])} "
                f"| {r['trained']:,.0f} | {r['round_seconds']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--dp", type=float, default=None, help="privacy.target-epsilon for dp-sgd on every row")
    parser.add_argument("--out", default="runs/bench-methods")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every row")
    args = parser.parse_args()
    runs = []
    for row in args.rows.split(","):
        if row not in ROWS:
            parser.error(f"--rows: unknown row {row!r}; choose from {', '.join(ROWS)}")
        run = run_row(row, args, Path(args.out) / row)
        print(json.dumps(run), flush=True)
        runs.append(run)
    print(table(runs))


if __name__ == "__main__":
    main()
