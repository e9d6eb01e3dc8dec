"""Eval loss against epsilon: the same federation without DP and with each mechanism at each budget.

Each point is a whole ``fedtune simulate`` run on a preset (the demo is ``smollm2``); the noise
multiplier is solved from the target for the planned rounds. Writes a PNG and prints a table:

    python benchmarks/privacy_tradeoff.py --preset smollm2 --out runs/privacy-tradeoff \\
        [--epsilons 1,4,8] [--mechanisms dp-sgd,central,distributed] [--clip-norm C] [--set KEY=VALUE ...]

``--clip-norm C`` gives ``central`` and ``distributed`` the same fixed C (no adaptive clipping), so the
two compare at the same sensitivity.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MECHANISM_SETTINGS = {
    "dp-sgd": [],
    # DP-FedAvg needs equal client weights; adaptive clipping spares choosing C by hand.
    "central": ["strategy.weighting=uniform", "privacy.adaptive-clip=true"],
    # The sites add Skellam shares inside SecAgg+; adaptive clipping would need each clipped bit in the clear.
    "distributed": ["strategy.weighting=uniform", "secagg.protocol=secagg"],
}


def run(preset: str, out: Path, sets: list[str]) -> dict[str, object]:
    if not (out / "summary.json").is_file():
        cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--preset", preset, "--out", str(out)]
        for item in sets:
            cmd += ["--set", item]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    summary: dict[str, object] = json.loads((out / "summary.json").read_text())
    return summary


def plot(points: dict[str, list[tuple[float, float]]], baseline: float, first: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mechanism, xy in points.items():
        xs, ys = zip(*sorted(xy), strict=True)
        ax.plot(xs, ys, marker="o", label=mechanism)
    ax.axhline(baseline, color="k", linestyle="--", label="no DP (epsilon = inf)")
    ax.axhline(first, color="grey", linestyle=":", label="base model (round 0)")
    ax.set_xscale("log")
    ax.set_yscale("log")  # no-DP and DP-SGD sit near 0.2-1.2, central DP on 5 sites far above
    ticks = sorted({x for xy in points.values() for x, _ in xy})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (delta = 1e-5; sample-level for dp-sgd, user-level for central)")
    ax.set_ylabel("final eval loss per response token (log)")
    ax.set_title("fedtune: eval loss against the privacy budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--out", default="runs/privacy-tradeoff")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--mechanisms", default="dp-sgd,central")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--plot", default="benchmarks/privacy_tradeoff.png")
    parser.add_argument("--clip-norm", type=float, default=0.0, help="fixed C for central and distributed")
    args = parser.parse_args()
    root = Path(args.out)
    base = run(args.preset, root / "no-dp", args.set)
    baseline, first = float(base["eval_loss_last"]), float(base["eval_loss_first"])  # type: ignore[arg-type]
    print("| mechanism | target epsilon | epsilon reached | noise multiplier | final eval loss | vs no DP |")
    print("|---|---|---|---|---|---|")
    print(f"| none | inf | inf | 0 | {baseline:.4f} | 1.00x |")
    points: dict[str, list[tuple[float, float]]] = {}
    for mechanism in args.mechanisms.split(","):
        for eps in (float(e) for e in args.epsilons.split(",")):
            sets = [*args.set, *MECHANISM_SETTINGS[mechanism], f"privacy.mechanism={mechanism}"]
            if args.clip_norm and mechanism in ("central", "distributed"):
                sets = [s for s in sets if "adaptive-clip" not in s] + [f"privacy.clip-norm={args.clip_norm}"]
            summary = run(args.preset, root / f"{mechanism}-eps{eps:g}", [*sets, f"privacy.target-epsilon={eps}"])
            loss = float(summary["eval_loss_last"])  # type: ignore[arg-type]
            privacy = summary["privacy"]
            assert isinstance(privacy, dict)
            reached = privacy["epsilon"]
            event = (privacy.get("events") or [{}])[0]
            noise = event.get("noise_multiplier", "Skellam" if "skellam_mu" in event else "per site")
            points.setdefault(mechanism, []).append((eps, loss))
            print(f"| {mechanism} | {eps:g} | {float(reached):.3f} | {noise} | {loss:.4f} | {loss / baseline:.2f}x |")
    plot(points, baseline, first, Path(args.plot))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
