"""Local-training time of the GPU-site settings against plain fp32 training, on the CPU.

For one model (SmolLM2-135M-Instruct by default, or the tiny preset) and LoRA r=8 on q,v, it times
one round of local training (``--steps`` optimizer steps on an effective batch of ``--batch``
examples) under each setting, alternating the settings in every repeat, and prints each median
against the plain fp32 median measured in the same run:

- ``fp32``: the baseline (``train_local``, one batch per step);
- ``accum-2``: the same effective batch as 2 accumulated micro-batches;
- ``checkpointing``: with ``train.gradient-checkpointing``;
- ``bf16``: bf16 autocast on the CPU;
- ``ddp-2``: ``train.num-processes = 2`` (gloo); the second rank is resident (spawned, with its
  base model, in the warm-up pass), as at a site after its first data-parallel round.

No GPU is involved: this measures what the settings cost on the CPU path, not what they gain on a
GPU. Usage:

    OMP_NUM_THREADS=1 python benchmarks/gpu_settings.py [--model smollm2|tiny] [--steps 2] [--repeats 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any

import torch

from fedtune.client.parallel import train_parallel
from fedtune.client.trainer import train_local
from fedtune.config import DataConfig, RunConfig
from fedtune.core.logs import quiet_libraries
from fedtune.core.paths import fedtune_home
from fedtune.data.loaders import DEMO_TRAIN
from fedtune.data.prompts import tokenize
from fedtune.model.adapters import adapter_arrays, init_adapter, load_adapter_arrays, set_trainable, wrap_lora
from fedtune.model.loading import load_base
from fedtune.model.tiny import build_tiny_model

SETTINGS = ("fp32", "accum-2", "checkpointing", "bf16", "ddp-2")


def model_path(name: str) -> str:
    if name == "tiny":
        return str(build_tiny_model(fedtune_home() / "tiny" / "base-model"))
    return "HuggingFaceTB/SmolLM2-135M-Instruct"


def run_config(name: str, steps: int, batch: int) -> RunConfig:
    return RunConfig.from_flat(
        {
            "model.name": model_path(name),
            "train.device": "cpu",
            "train.local-steps": steps,
            "train.batch-size": batch,
            "lora.r": 8,
            "lora.alpha": 16,
            "lora.dropout": 0.0,
            "lora.target-modules": "q_proj,v_proj",
        }
    )


def one_round(setting: str, model: Any, examples: list[Any], cfg: RunConfig, start: Any, pad: int, seed: int) -> float:
    load_adapter_arrays(model, start)
    train = cfg.train
    if setting == "accum-2":
        train = dataclasses.replace(train, batch_size=train.batch_size // 2, grad_accum_steps=2)
    elif setting == "checkpointing":
        train = dataclasses.replace(train, gradient_checkpointing=True)
    elif setting == "bf16":
        train = dataclasses.replace(train, precision="bf16")
    began = time.perf_counter()
    if setting == "ddp-2":
        parallel = cfg.override({"train.num-processes": 2})
        train_parallel(model, examples, parallel, lora_rank=8, start=start, seed=seed, pad_id=pad, desc=setting)
    else:
        train_local(model, examples, train, pad_id=pad, generator=torch.Generator().manual_seed(seed), desc=setting)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
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
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for i in range(args.repeats + 1):  # the first pass warms up
        for setting in SETTINGS:
            seconds = one_round(setting, model, examples, cfg, start, pad, seed=i)
            if i:
                times[setting].append(seconds)
    base = statistics.median(times["fp32"])
    threads = torch.get_num_threads()
    print(f"model={args.model} steps={args.steps} batch={args.batch} repeats={args.repeats} threads={threads}")
    print("| setting | round (s) | / fp32 |")
    print("|---|---|---|")
    for setting in SETTINGS:
        med = statistics.median(times[setting])
        print(f"| {setting} | {med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
