"""Peak memory and time per site-round of the ``shared`` backend: 2 sites against 50.

Each configuration runs in a fresh subprocess (so one run's peak cannot hide in another's): the
whole federation (server loop, every site's real ClientApp, checkpoints, the final sample answer)
on the in-process backend. The child reports its peak resident set size (``ru_maxrss``) at the end,
and after every site's turn its current RSS and the seconds the turn took, so a per-round leak
shows as RSS climbing from round to round. The demo data has 1,000 training rows, so 50 sites use
the ``iid`` partitioner (20 rows each); the ``tiny`` preset's Dirichlet split and the demo's
``natural`` split (one site per hospital) cannot make 50 sites.

    .venv/bin/python benchmarks/shared_memory.py [--presets tiny,smollm2] [--sites 2,50] [--rounds 3] [--no-trim]

``--no-trim`` also measures each configuration with the backend's per-turn ``malloc_trim`` off
(``fedtune.simulations.local.release_heap``), the baseline that fix is judged against.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Kept small so 50 SmolLM2 sites finish in minutes on 2 cores; the model is what dominates memory.
SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "smollm2": {"train.batch-size": 2, "data.max-seq-len": 128, "data.max-eval-examples": 2},
}
COMMON = {
    "simulation.backend": "shared",
    "data.partitioner": "iid",
    "train.local-steps": 1,
    "eval.federated": False,
    "eval.centralized": False,
    "train.num-threads": 1,
}


def rss_mib() -> float:
    """This process's current resident set size (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(preset_name: str, sites: int, rounds: int, out: Path, trim: bool) -> None:
    """Run one federation in this process and print one JSON line with its measurements."""
    from flwr.app import Context, Message

    from fedtune.client.app import app as client_app
    from fedtune.simulations import local

    if not trim:  # the backend as it was before it handed freed heap pages back after each turn
        local._TRIM = None
    from fedtune.config.plan import Plan
    from fedtune.config.presets import preset
    from fedtune.model.tiny import build_tiny_model
    from fedtune.server.app import run_server
    from fedtune.simulations.local import LocalGrid

    flat: dict[str, Any] = {**preset(preset_name), **COMMON, **SETTINGS[preset_name]}
    flat.update({"simulation.num-supernodes": sites, "num-server-rounds": rounds, "output.dir": str(out)})
    if preset_name == "tiny":
        flat["model.name"] = str(build_tiny_model(out.parent / "base-model"))
    turns: list[dict[str, float]] = []

    def timed(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        reply = client_app(msg, context)
        turns.append({"round": int(msg.metadata.group_id), "s": time.perf_counter() - start, "rss": rss_mib()})
        return reply

    wrapped: Callable[[Message, Context], Message] = timed
    before = rss_mib()
    run_server(Plan.from_flat(flat), LocalGrid(wrapped, sites))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["replied"] == sites, rows[1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    per_round = {
        r: {
            "rss_end": [t["rss"] for t in turns if t["round"] == r][-1],
            "s_per_site": statistics.mean(t["s"] for t in turns if t["round"] == r),
        }
        for r in range(1, rounds + 1)
    }
    print(json.dumps({"peak": peak, "start": before, "rounds": per_round}))


def measure(preset_name: str, sites: int, rounds: int, trim: bool) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and parse its JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--child", preset_name, str(sites), str(rounds), str(Path(tmp) / "run")]
        cmd += [] if trim else ["--no-trim"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{preset_name} x {sites} sites failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="tiny,smollm2")
    parser.add_argument("--sites", default="2,50", help="the first is the baseline")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-trim", action="store_true", help="also measure without the per-turn heap trim")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, sites, rounds, out = args.child
        child(name, int(sites), int(rounds), Path(out), trim=not args.no_trim)
        return
    counts = [int(x) for x in args.sites.split(",")]
    print(
        "| preset | heap trim | sites | peak RSS (MiB) | ratio to first | RSS after each round (MiB) "
        "| s per site-turn, each round | ratio to first (round 1) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, trim in ((p, t) for p in args.presets.split(",") for t in ((True, False) if args.no_trim else (True,))):
        base: dict[str, Any] | None = None
        for n in counts:
            got = measure(name, n, args.rounds, trim)
            base = base or got
            rounds = got["rounds"]
            after = ", ".join(f"{r['rss_end']:.0f}" for r in rounds.values())
            secs = ", ".join(f"{r['s_per_site']:.2f}" for r in rounds.values())
            t_ratio = rounds["1"]["s_per_site"] / base["rounds"]["1"]["s_per_site"]
            print(
                f"| {name} | {'on' if trim else 'off'} | {n} | {got['peak']:.0f} "
                f"| {got['peak'] / base['peak']:.3f} | {after} "
                f"| {secs} | {t_ratio:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
