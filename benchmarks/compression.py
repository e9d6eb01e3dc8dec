"""Bytes and eval loss of each uplink encoding against float32, same seed, one process.

Each scheme runs the same federation (the ``shared`` backend: every site in this process on one
resident base model, so the model loads once for all of them) and the table reports, per scheme,
the bytes each client sent per round and the final centralized eval loss, both as ratios to
``compression.uplink = none`` measured in the same invocation:

    python benchmarks/compression.py --preset smollm2 --out runs/compression [--rounds 3] \\
        [--schemes none,int16,int8,int4,topk] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from fedtune.config import parse_assignments
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.simulations.run import simulate


def run(flat: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` rows (the run is skipped when it already finished)."""
    if not (out / "summary.json").is_file():
        simulate(Plan.from_flat({**flat, "output.dir": str(out)}))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def per_client_up(rows: list[dict[str, Any]]) -> float:
    """Mean bytes one client sent in one round."""
    return statistics.mean(c["up"] for r in rows[1:] for c in r.get("bytes_per_client", {}).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--out", type=Path, default=Path("runs/compression"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--schemes", default="none,int16,int8,int4,topk")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = {
        **preset(args.preset),
        "num-server-rounds": args.rounds,
        "simulation.backend": "shared",
        **parse_assignments(args.sets),
    }
    results = {}
    for scheme in args.schemes.split(","):
        rows = run({**base, "compression.uplink": scheme}, args.out / scheme)
        results[scheme] = {
            "up": per_client_up(rows),
            "loss": rows[-1]["eval_loss"],
            "first": rows[0]["eval_loss"],
            "seconds": statistics.mean(r["seconds"] for r in rows[1:]),
        }
    ref = results["none"]
    print(
        "| uplink | bytes up per client per round | ratio to none | final eval loss | ratio to none | "
        "mean round seconds |"
    )
    print("|---|---|---|---|---|---|")
    for scheme, r in results.items():
        print(
            f"| {scheme} | {r['up']:,.0f} | {r['up'] / ref['up']:.4f} | {r['loss']:.4f} | "
            f"{r['loss'] / ref['loss']:.4f} | {r['seconds']:.1f} |"
        )
    print(f"\nround-0 eval loss (base model): {ref['first']:.4f}")
    (args.out / "table.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
