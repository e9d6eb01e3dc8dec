"""A data-parallel site's round before and after resident ranks (issue 17), in one invocation.

``before`` is ``fedtune.client.parallel`` as of commit 99c8fb9 (read from git): every round spawns
ranks 1..P-1, and each loads the base model. ``after`` is the current code: the ranks are spawned
at the first round and kept, with the base model loaded. Both train the same site (SmolLM2 by
default, LoRA r=8 on q,v, ``train.num-processes = 2`` over gloo, one torch thread per rank) from
the same global adapter; the modes alternate round by round, after the ``after`` pool's first round
(which spawns, and is reported on its own). Usage:

    OMP_NUM_THREADS=1 python benchmarks/resident_ranks.py [--model smollm2|tiny] [--rounds 3] [--steps 2] [--batch 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fedtune.client import ranks
from fedtune.client.parallel import train_parallel
from fedtune.config import DataConfig, RunConfig
from fedtune.core.logs import quiet_libraries
from fedtune.core.paths import fedtune_home
from fedtune.data.loaders import DEMO_TRAIN
from fedtune.data.prompts import tokenize
from fedtune.model.adapters import adapter_arrays, init_adapter, load_adapter_arrays, set_trainable, wrap_lora
from fedtune.model.loading import load_base
from fedtune.model.tiny import build_tiny_model

BEFORE = "99c8fb9"


def run_config(name: str, steps: int, batch: int) -> RunConfig:
    """As ``benchmarks/gpu_settings.py``, with two data-parallel processes."""
    path = str(build_tiny_model(fedtune_home() / "tiny" / "base-model")) if name == "tiny" else ""
    return RunConfig.from_flat(
        {
            "model.name": path or "HuggingFaceTB/SmolLM2-135M-Instruct",
            "train.device": "cpu",
            "train.local-steps": steps,
            "train.batch-size": batch,
            "train.num-processes": 2,
            "lora.r": 8,
            "lora.alpha": 16,
            "lora.dropout": 0.0,
            "lora.target-modules": "q_proj,v_proj",
        }
    )


def before_module(tmp: Path) -> ModuleType:
    """The old module as an importable top-level module (spawned ranks import it by name)."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:fedtune/client/parallel.py"], capture_output=True, text=True, check=True
    ).stdout
    (tmp / "parallel_before.py").write_text(source)
    sys.path.insert(0, str(tmp))
    spec = importlib.util.spec_from_file_location("parallel_before", tmp / "parallel_before.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["parallel_before"] = module
    spec.loader.exec_module(module)
    return module


def one_round(train: Any, model: Any, examples: list[Any], cfg: Any, start: Any, pad: int, seed: int) -> float:
    load_adapter_arrays(model, start)
    began = time.perf_counter()
    train(model, examples, cfg, lora_rank=8, start=start, seed=seed, pad_id=pad, desc="site 0 round 1")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    quiet_libraries()
    cfg = run_config(args.model, args.steps, args.batch)
    loaded = load_base(cfg.model, torch.device("cpu"))
    model = wrap_lora(loaded, cfg.lora)
    init_adapter(model, seed=0)
    set_trainable(model, freeze_a=False)
    start = adapter_arrays(model)
    records = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[: 4 * args.batch]]
    examples = tokenize(records, DataConfig(format="chat", max_seq_len=256), loaded.tokenizer)
    pad = int(loaded.tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        old = before_module(Path(tmp)).train_parallel
        first = one_round(train_parallel, model, examples, cfg, start, pad, seed=0)
        times: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(1, args.rounds + 1):
            times["before"].append(one_round(old, model, examples, cfg, start, pad, seed=i))
            times["after"].append(one_round(train_parallel, model, examples, cfg, start, pad, seed=i))
        ranks.shutdown()
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"model={args.model} steps={args.steps} batch={args.batch} rounds={args.rounds} processes=2 (gloo)")
    print("| mode | round (s), median | / before |")
    print("|---|---|---|")
    print(f"| before: ranks spawned every round | {before:.2f} | 1.00x |")
    print(f"| after, first round (spawns the ranks) | {first:.2f} | {first / before:.2f}x |")
    print(f"| after, later rounds (resident ranks) | {after:.2f} | {after / before:.2f}x |")
    print("rounds:", {k: [round(t, 2) for t in v] for k, v in times.items()})


if __name__ == "__main__":
    main()
