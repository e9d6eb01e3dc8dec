"""Server aggregation cost against a bare numpy sum of the same arrays, measured in the same run.

Each of N clients sends a 4.40M-parameter delta: the shapes of LoRA r=8 on every linear layer of
Qwen2.5-0.5B. fedtune's per-reply path (validate_delta + the strategy's add) and the final result
are timed against ``np.add(acc, delta, out=acc)`` over the same arrays; tracemalloc's peak shows
whether server memory grows with N.

    .venv/bin/python benchmarks/aggregation.py [--clients 10,100,1000] [--strategies fedavg,median]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from fedtune.config import StrategyConfig
from fedtune.server.validation import validate_delta
from fedtune.strategies import make_aggregator

# Qwen2.5-0.5B: hidden 896, intermediate 4864, 24 layers, GQA k/v 128 wide.
LINEARS = {
    "q": (896, 896),
    "k": (896, 128),
    "v": (896, 128),
    "o": (896, 896),
    "gate": (896, 4864),
    "up": (896, 4864),
    "down": (4864, 896),
}
RANK, LAYERS, POOL = 8, 24, 4


def shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for layer in range(LAYERS):
        for name, (fan_in, fan_out) in LINEARS.items():
            out[f"layers.{layer}.{name}.lora_A.weight"] = (RANK, fan_in)
            out[f"layers.{layer}.{name}.lora_B.weight"] = (fan_out, RANK)
    return out


def run(name: str, n: int, pool: list[dict[str, np.ndarray]], reference: dict[str, np.ndarray], check: bool) -> float:
    """fedtune's server path for n replies: (validate,) add, and the final result; returns seconds."""
    start = time.perf_counter()
    rule, _, dtype = name.partition("/")
    agg = make_aggregator(StrategyConfig(name=rule, sum_dtype=dtype or "float64"), reference)  # type: ignore[arg-type]
    for i in range(n):
        delta = pool[i % POOL]  # the reply as deserialized (dropped after add)
        if check:
            validate_delta(delta, reference, max_norm=0.0)
        agg.add(delta, float(1 + i % 7))
    agg.result()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--strategies", default="fedavg,fedavg/float32,median")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    spec = shapes()
    params = sum(int(np.prod(s)) for s in spec.values())
    pool = [{k: rng.normal(scale=1e-3, size=s).astype(np.float32) for k, s in spec.items()} for _ in range(POOL)]
    reference = {k: np.zeros(s, np.float32) for k, s in spec.items()}
    print(f"delta: {params / 1e6:.2f}M parameters, {params * 4 / 2**20:.1f} MiB float32")
    print(
        "| strategy | N | bare numpy sum (s) | aggregate (s) | ratio | validate + aggregate (s) | ratio "
        "| peak traced memory (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.strategies.split(","):
        for n in (int(x) for x in args.clients.split(",")):
            if not name.startswith("fedavg") and n * params * 4 > 8 * 2**30:
                gib = n * params * 4 / 2**30
                print(f"| {name} | {n} | - | skipped: holds every update ({gib:.0f} GiB) | - | - | - | - |")
                continue
            acc = {k: np.zeros(s, np.float32) for k, s in spec.items()}
            start = time.perf_counter()
            for i in range(n):
                for k, v in pool[i % POOL].items():
                    np.add(acc[k], v, out=acc[k])
            bare = time.perf_counter() - start
            plain = run(name, n, pool, reference, check=False)
            checked = run(name, n, pool, reference, check=True)
            tracemalloc.start()  # a last pass: tracing slows allocation, so it is not timed
            run(name, n, pool, reference, check=False)
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            print(
                f"| {name} | {n} | {bare:.3f} | {plain:.3f} | {plain / bare:.2f} "
                f"| {checked:.3f} | {checked / bare:.2f} | {peak:.0f} |"
            )


if __name__ == "__main__":
    main()
