"""Deployed round time with the default wire format (lossless float32 packed into one array, which
``compression.* = none`` means since issue 17) against packed int8, same invocation. (The one array
per PEFT key format this compared before is gone; BENCHMARKS.md keeps its figures.)

Reuses ``deploy_round.py``'s harness: ``fedtune server`` + N x ``fedtune client`` (with the site
worker) on 127.0.0.1 with TLS and SuperNode authentication; the SuperNodes' own log lines give the
seconds spent pulling each message from the SuperLink and pushing each reply. Prints markdown:

    .venv/bin/python benchmarks/packed_transport.py --preset tiny --sites 3 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from deploy_round import run_variant, setup

BASELINE = "packed float32 (default, baseline)"
VARIANTS = {
    BASELINE: [],
    "packed int8": ["compression.uplink=int8", "compression.downlink=int8"],
}


def main() -> None:
    args, root, keys = setup(__doc__.splitlines()[0], "fedtune-packed-")
    results = {}
    for i, (name, sets) in enumerate(VARIANTS.items()):
        variant = argparse.Namespace(**{**vars(args), "set": [*args.set, *sets]})
        results[name] = run_variant(keys, root / f"v{i}", variant, worker=True)
    base = results[BASELINE]
    print(f"\n{args.preset}, {args.sites} sites, {args.rounds} rounds, sets {args.set}\n")
    rounds = " | ".join(f"round {r} (s)" for r in range(1, args.rounds + 1))
    print(
        f"| variant | bytes up per client | {rounds} | ratio to baseline | pull message, mean (s) "
        "| push reply, mean (s) | eval loss |"
    )
    print("|---|---|" + "---|" * (args.rounds + 4))
    for name, result in results.items():
        rows = result["rows"][1:]
        ratio = " / ".join(f"{r['seconds'] / b['seconds']:.2f}" for r, b in zip(rows, base["rows"][1:], strict=True))
        per = [s[r] for s in result["sites"] for r in s if r >= 1]
        pull = statistics.mean(p["pull"] for p in per if "pull" in p)
        push = statistics.mean(p["push"] for p in per if "push" in p)
        up = statistics.mean(c["up"] for r in rows for c in r["bytes_per_client"].values())
        cells = [f"{up:,.0f}", *(f"{r['seconds']:.1f}" for r in rows), ratio, f"{pull:.2f}", f"{push:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + f" | {rows[-1]['eval_loss']:.4f} |")


if __name__ == "__main__":
    main()
