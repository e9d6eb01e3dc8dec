"""Centralized eval time with generated-answer task metrics against a loss-only eval (BENCHMARKS.md).

Usage: ``python benchmarks/eval_metrics.py --run OUT [--repeats 3]`` on a finished run (for example
``fedtune simulate --preset smollm2 --out OUT``). It loads the run's config and final adapter, then
times the server's held-out evaluation in this one process, alternating the variants so that a
change in machine load hits them alike: ``eval.metrics = loss`` (the baseline) and the run's own
``eval.metrics``, each on the base model (what round 0 evaluates) and on the final adapter. It also
prints the task metrics of both, so the base vs final figures come from the same script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from safetensors.numpy import load_file

from fedtune.config import RunConfig
from fedtune.model.adapters import adapter_arrays, init_adapter, wrap_lora
from fedtune.model.loading import load_base, pick_device
from fedtune.server.evaluation import CentralEvaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = RunConfig.from_flat(json.loads((args.run / "summary.json").read_text())["config"])
    loaded = load_base(cfg.model, pick_device("auto"))
    model = wrap_lora(loaded, cfg.lora)
    init_adapter(model, cfg.seed)
    adapters = {
        "base model": adapter_arrays(model),
        "final adapter": load_file(str(args.run / "adapter" / "adapter_model.safetensors")),
    }
    evaluator = CentralEvaluator(cfg, loaded)
    variants = {
        "loss only (baseline)": cfg.override({"eval.metrics": "loss"}),
        f"eval.metrics = {cfg.eval.metrics}": cfg,
    }
    print(
        f"{len(evaluator.examples)} held-out examples for the loss, {cfg.eval.max_generate} generated, "
        f"eval.max-new-tokens = {cfg.eval.max_new_tokens}",
        flush=True,
    )
    for name, arrays in adapters.items():
        times: dict[str, list[float]] = {v: [] for v in variants}
        scores = {}
        for _ in range(args.repeats):
            for variant, vcfg in variants.items():
                start = time.perf_counter()
                scores = evaluator(arrays, vcfg)
                times[variant].append(time.perf_counter() - start)
        base_time = statistics.median(times["loss only (baseline)"])
        print(f"{name}: {', '.join(f'{k} {v:.3f}' for k, v in scores.items())}", flush=True)
        for variant, values in times.items():
            median = statistics.median(values)
            print(f"  {variant}: median {median:.2f} s over {args.repeats} ({median / base_time:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
