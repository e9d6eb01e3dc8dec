"""Synchronous against buffered asynchronous rounds (issue 19) with one site 5x slower, in the same run.

The tiny preset (or ``--preset smollm2``, the demo) on the ``shared`` backend with ``--sites`` sites;
``simulation.site-delays`` gives the fast sites ``--delay`` extra seconds per local step and the slow one
``--slow-delay`` (default 5x ``--delay``). Sync runs ``--rounds`` rounds;
async (``server.buffer-size`` K) runs ``--versions`` versions. Reported from each run's metrics.jsonl
(wall-clock = the rows' ``seconds`` summed, evaluation included): the final held-out loss, the seconds
async needs to reach sync's final loss, and the loss async holds when sync finishes.

    flock /work/helpers/heavy.lock .venv/bin/python benchmarks/async_rounds.py [--delay 0.25] [--rounds 4]
    flock /work/helpers/heavy.lock .venv/bin/python benchmarks/async_rounds.py --preset smollm2 --sites 5 \
        --delay 0 --slow-delay 10 --rounds 2 --versions 6 --eval-metrics loss
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from fedtune.client.app import app as client_app
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.core.logs import setup_logging
from fedtune.model.tiny import build_tiny_model
from fedtune.server.app import run_server
from fedtune.simulations.local import LocalGrid


def federate(tmp: Path, name: str, flat: dict[str, Any], sites: int) -> list[tuple[float, float]]:
    """(cumulative seconds, eval loss) after round 0 and each round or version."""
    out = tmp / name
    plan = Plan.from_flat({**flat, "output.dir": str(out)})
    run_server(plan, LocalGrid(client_app, sites))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve, elapsed = [(0.0, float(rows[0]["eval_loss"]))], 0.0
    for row in rows[1:]:
        elapsed += float(row["seconds"])
        curve.append((elapsed, float(row["eval_loss"])))
    return curve


def first_reaching(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, loss in curve if loss <= target), None)


def loss_at(curve: list[tuple[float, float]], when: float) -> float:
    return [loss for t, loss in curve if t <= when][-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.25, help="fast sites' extra seconds per local step")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--versions", type=int, default=16)
    parser.add_argument("--buffer-size", type=int, default=2)
    parser.add_argument("--preset", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--slow-delay", type=float, help="the slow site's extra seconds per step (default 5x --delay)")
    parser.add_argument("--local-steps", type=int, help="train.local-steps (default: the preset's)")
    parser.add_argument("--eval-metrics", help="eval.metrics (default: the preset's)")
    args = parser.parse_args()
    slow = 5 * args.delay if args.slow_delay is None else args.slow_delay
    setup_logging()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        base = {
            **preset(args.preset),
            "simulation.backend": "shared",
            "simulation.num-supernodes": args.sites,
            "server.min-clients": args.sites,
            "eval.federated": False,
            "simulation.site-delays": ",".join([str(args.delay)] * (args.sites - 1) + [str(slow)]),
        }
        if args.preset == "tiny":
            base["model.name"] = str(build_tiny_model(tmp / "base-model", seed=0))
        if args.local_steps is not None:
            base["train.local-steps"] = args.local_steps
        if args.eval_metrics is not None:
            base["eval.metrics"] = args.eval_metrics
        sync = federate(tmp, "sync", {**base, "num-server-rounds": args.rounds}, args.sites)
        asyn = federate(
            tmp,
            "async",
            {
                **base,
                "num-server-rounds": args.versions,
                "server.mode": "async",
                "server.buffer-size": args.buffer_size,
            },
            args.sites,
        )
    target, sync_time = sync[-1][1], sync[-1][0]
    reach = first_reaching(asyn, target)
    print(f"{args.preset}: site delays {base['simulation.site-delays']} s per step; K = {args.buffer_size}")
    print("| mode | rounds / versions | final eval loss | seconds | to sync's final loss | loss at sync's end |")
    print("|---|---|---|---|---|---|")
    print(f"| sync | {args.rounds} | {target:.4f} | {sync_time:.1f} | {sync_time:.1f} | {target:.4f} |")
    reached = f"{reach:.1f} ({reach / sync_time:.2f}x)" if reach is not None else "not reached"
    print(
        f"| async | {args.versions} | {asyn[-1][1]:.4f} | {asyn[-1][0]:.1f} | {reached} | "
        f"{loss_at(asyn, sync_time):.4f} |"
    )


if __name__ == "__main__":
    main()
