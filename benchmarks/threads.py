"""Seconds per local training step under ``train.num-threads`` = torch's default against auto (issue 15).

Each configuration starts P training processes at once, as fedtune starts them on one machine: the
``shared`` backend is one (every site takes its turn in it), a loopback demo federation of 3 sites
is three site workers. Each process loads the preset's base model through fedtune, wraps it with
LoRA and times forward + backward + AdamW steps on a fixed batch of the demo data. "before" leaves
torch's default (one thread per usable core in every process: what ``train.num-threads = 0`` did);
"after" is the automatic choice (``fedtune.model.threads``), told P by the launcher as fedtune
does. "other work" adds one busy process beside a single trainer (fedtune cannot see it) and
compares torch's default with the README's advice, ``train.num-threads`` = cores - 1. Everything runs
in one invocation, one configuration after the other; run it under the heavy lock.

    .venv/bin/python benchmarks/threads.py [--preset tiny|smollm2] [--steps 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = "--worker"


def _worker(preset: str, steps: int, setting: str) -> None:
    """One training process: time ``steps`` steps after two warm-up steps; print seconds per step."""
    import torch

    from fedtune.client.trainer import train_local
    from fedtune.config import RunConfig
    from fedtune.config.presets import preset as preset_flat
    from fedtune.core.paths import tiny_model_dir
    from fedtune.data.loaders import load_records, train_source
    from fedtune.data.prompts import tokenize
    from fedtune.model import threads
    from fedtune.model.methods import load_for, wrap
    from fedtune.model.tiny import build_tiny_model

    flat = preset_flat(preset)
    if preset == "tiny":
        flat["model.name"] = str(build_tiny_model(tiny_model_dir()))
    if setting != "default":
        flat["train.num-threads"] = int(setting)
    cfg = RunConfig.from_flat(flat)
    if setting != "default":
        threads.apply(cfg.train.num_threads)
    loaded = load_for(cfg, torch.device("cpu"))
    model = wrap(loaded, cfg)
    rows = load_records(train_source(cfg.data), cfg.data).select(range(64))
    examples = tokenize(rows, cfg.data, loaded.tokenizer)
    pad = loaded.tokenizer.pad_token_id or 0
    run = dataclasses.replace(cfg.train, local_steps=2)
    train_local(model, examples, run, pad_id=pad, generator=torch.Generator().manual_seed(0), desc="warm-up")
    run = dataclasses.replace(cfg.train, local_steps=steps)
    start = time.perf_counter()
    train_local(model, examples, run, pad_id=pad, generator=torch.Generator().manual_seed(1), desc="timed")
    print(json.dumps({"s_per_step": (time.perf_counter() - start) / steps, "threads": torch.get_num_threads()}))


def _busy() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _measure(preset: str, steps: int, processes: int, setting: str, busy: bool = False) -> tuple[float, int]:
    """Mean seconds per step over ``processes`` concurrent trainers, and their thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update({"FEDTUNE_TRAINING_PROCESSES": str(processes), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    other = _busy() if busy else None
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, WORKER, preset, str(steps), setting], stdout=subprocess.PIPE, env=env
            )
            for _ in range(processes)
        ]
        results = [json.loads(p.communicate()[0].decode().strip().splitlines()[-1]) for p in procs]
    finally:
        if other is not None:
            other.kill()
            other.wait()
    return statistics.mean(r["s_per_step"] for r in results), int(results[0]["threads"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="before/after pairs, alternating; medians reported")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    cases = [
        ("shared backend (1 training process)", 1, "0", False),
        ("loopback demo federation (3 site workers)", 3, "0", False),
        ("shared backend + 1 busy process, train.num-threads = cores - 1", 1, str(max(1, cores - 1)), True),
    ]
    print(f"{args.preset}, {cores} usable cores, {args.steps} steps per process, median of {args.repeats}\n")
    print("| configuration | before: threads, s/step | after: threads, s/step | before / after |")
    print("|---|---|---|---|")
    for name, processes, after, busy in cases:
        pairs = [
            (
                _measure(args.preset, args.steps, processes, "default", busy),
                _measure(args.preset, args.steps, processes, after, busy),
            )
            for _ in range(args.repeats)
        ]
        before_s, before_t = statistics.median(b[0] for b, _ in pairs), pairs[0][0][1]
        after_s, after_t = statistics.median(a[0] for _, a in pairs), pairs[0][1][1]
        print(f"| {name} | {before_t}, {before_s:.3f} | {after_t}, {after_s:.3f} | {before_s / after_s:.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER:
        _worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
