"""Where a demo round's time goes, before and after computing logits only at scored positions.

Runs the demo federation (``--preset smollm2``, ``simulation.backend = shared``: every site in this
process, in turn, so the per-round ``time`` breakdown of ``metrics.jsonl`` adds up to the round's
wall time) with the previous loss computation (logits at every position: the baseline, patched in
here) and with the current one, alternating ``--repeats`` times so both see the same load. Prints the
median breakdown of round 1 per variant, in seconds, and the ratio after / before:

    python benchmarks/round_time.py --preset smollm2 --out runs/round-time [--repeats 2] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from fedtune.client import trainer
from fedtune.config import parse_assignments
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.data.prompts import IGNORE, token_losses
from fedtune.simulations.run import simulate

PARTS = ["load", "train", "serialize", "transport", "server_serialize", "aggregate", "eval"]


def full_logits_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous ``token_losses``: logits (and their softmax) at every position."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = logits[:, :-1, :].float()  # (B, T-1, V)
    target = batch["labels"][:, 1:]  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, (target != IGNORE).sum()


VARIANTS = {"before: logits at every position": full_logits_losses, "after: logits at scored positions": token_losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--out", type=Path, default=Path("runs/round-time"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    flat = {
        **preset(args.preset),
        "num-server-rounds": 1,
        "simulation.backend": "shared",
        **parse_assignments(args.sets),
    }
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for rep in range(args.repeats):
        for i, (name, losses) in enumerate(VARIANTS.items()):
            out = args.out / f"v{i}-r{rep}"
            trainer.token_losses = losses  # type: ignore[attr-defined]  # train and held-out eval use it
            if not (out / "summary.json").is_file():
                simulate(Plan.from_flat({**flat, "output.dir": str(out)}))
            rows[name].append(json.loads((out / "metrics.jsonl").read_text().splitlines()[1]))
    trainer.token_losses = token_losses  # type: ignore[attr-defined]
    before = next(iter(rows.values()))
    print("| variant | round (s) | " + " | ".join(PARTS) + " | round ratio | train ratio | eval loss |")
    print("|---|---|" + "---|" * (len(PARTS) + 3))
    for name, runs in rows.items():
        med = {p: statistics.median(r["time"][p] for r in runs) for p in PARTS}
        sec = statistics.median(r["seconds"] for r in runs)
        ratio = sec / statistics.median(r["seconds"] for r in before)
        train = med["train"] / statistics.median(r["time"]["train"] for r in before)
        cells = [f"{sec:.1f}", *(f"{med[p]:.2f}" for p in PARTS), f"{ratio:.2f}", f"{train:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + f" | {runs[-1]['eval_loss']:.4f} |")


if __name__ == "__main__":
    main()
