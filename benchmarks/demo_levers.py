"""The demo's time levers in one invocation: `fedtune simulate --preset smollm2` with each lever's
`--set`s, one run after another, wall time from process start to exit, against the first run.

    PYTHONPATH=. .venv/bin/python benchmarks/demo_levers.py --runs preset,fed-eval-every-round,no-fed-eval

Each run's row gives its wall time and ratio to the first run, each round's seconds
(``metrics.jsonl``), the final held-out eval loss and the final task metrics (``summary.json``), so
a lever's cost in quality shows beside its time. The runs' output folders stay under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Each lever: the `--set` assignments it adds to the preset.
LEVERS: dict[str, list[str]] = {
    "preset": [],
    "fp32": ["train.precision=fp32"],
    "no-fed-eval": ["eval.federated=false"],
    "fed-eval-every-round": ["eval.federated-every=1"],  # the preset before session 11
    # the preset's eval.federated-every = 0 through the round plan (3 rounds), as session 11 first measured it
    "fed-eval-last-plan": ["eval.federated=false", "plan.3.eval.federated=true"],
}
TASK = ("exact_match", "f1", "rouge_l")


@dataclass(frozen=True)
class Result:
    """One run: its wall time and what its output files say."""

    name: str
    sets: list[str]
    wall: float
    rounds: list[float | None]
    loss: float | None
    task: list[float | None]


def run(name: str, sets: list[str], out: Path, preset: str) -> Result:
    """One `fedtune simulate` run; its wall time and what its output files say."""
    folder = out / name
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--preset", preset, "--out", str(folder)]
    for assignment in sets:
        cmd += ["--set", assignment]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise SystemExit(f"run {name!r} failed (exit {done.returncode}): {' | '.join(tail)}")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((folder / "summary.json").read_text())
    final = summary["final"]
    return Result(
        name, sets, wall, [row.get("seconds") for row in rows], summary["eval_loss_last"], [final.get(k) for k in TASK]
    )


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="preset,fed-eval-every-round,no-fed-eval", help=f"from {', '.join(LEVERS)}")
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--out", type=Path, default=Path("runs/demo-levers"))
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        parser.error(f"--runs: unknown lever(s) {', '.join(unknown)}; known: {', '.join(LEVERS)}")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = [run(n, LEVERS[n], args.out, args.preset) for n in names]
    base = results[0].wall
    print("| run | `--set` | wall | / first | rounds (s) | final eval loss | exact match / F1 / ROUGE-L |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        rounds = " / ".join(_fmt(s, ".1f") for s in r.rounds)
        task = " / ".join(_fmt(v, ".3f") for v in r.task)
        sets, loss = " ".join(r.sets) or "-", _fmt(r.loss, ".5f")
        print(f"| {r.name} | {sets} | {r.wall:.1f} s | {r.wall / base:.2f} | {rounds} | {loss} | {task} |")


if __name__ == "__main__":
    main()
