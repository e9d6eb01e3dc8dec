"""DP-SGD step time against a plain step, on the same model, adapter and data.

For each model (the tiny preset, SmolLM2-135M-Instruct) and LoRA target (q,v and all linear
layers), it times fedtune's plain trainer (``train_local``) and its DP-SGD trainer (``train_dp``,
Opacus hooks) for the same number of steps on the same B examples, alternating the two, and prints
the ratio of medians. DP-SGD runs at sample rate 1 on those B examples, so every step sees exactly
the batch the plain step sees (Poisson batches of expected size B would add batch-size noise to a
few steps' timing). Usage:

    python benchmarks/dp_step.py [--models tiny,smollm2] [--steps 8] [--repeats 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedtune.client.dp_trainer import DPSettings, train_dp
from fedtune.client.trainer import train_local
from fedtune.config import DataConfig, LoraSection, ModelConfig, TrainConfig
from fedtune.core.logs import quiet_libraries
from fedtune.core.paths import fedtune_home
from fedtune.data.loaders import DEMO_TRAIN
from fedtune.data.prompts import tokenize
from fedtune.model.adapters import init_adapter, set_trainable, wrap_lora
from fedtune.model.loading import load_base
from fedtune.model.tiny import build_tiny_model

TARGETS = {"q,v": "q_proj,v_proj", "all-linear": "all-linear"}


def model_path(name: str) -> str:
    if name == "tiny":
        return str(build_tiny_model(fedtune_home() / "tiny" / "base-model"))
    return "HuggingFaceTB/SmolLM2-135M-Instruct"


def bench(name: str, target: str, steps: int, repeats: int, batch: int) -> tuple[float, float]:
    loaded = load_base(ModelConfig(name=model_path(name)), torch.device("cpu"))
    model = wrap_lora(loaded, LoraSection(r=8, alpha=16, dropout=0.0, target_modules=TARGETS[target]))
    init_adapter(model, seed=0)
    set_trainable(model, freeze_a=False)
    records = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:batch]]
    examples = tokenize(records, DataConfig(format="chat", max_seq_len=256), loaded.tokenizer)[:batch]
    cfg = TrainConfig(local_steps=steps, batch_size=batch, max_grad_norm=0.0)
    pad = int(loaded.tokenizer.pad_token_id)
    dp = DPSettings(1.0, 1.0, 1.0, steps)
    plain_times, dp_times = [], []
    for i in range(repeats + 1):  # the first pair warms up
        start = time.perf_counter()
        train_local(model, examples, cfg, pad_id=pad, generator=torch.Generator().manual_seed(i), desc="plain")
        plain = time.perf_counter() - start
        start = time.perf_counter()
        train_dp(model, examples, cfg, dp, pad_id=pad, desc="dp", generator=torch.Generator().manual_seed(i))
        private = time.perf_counter() - start
        if i:
            plain_times.append(plain / steps)
            dp_times.append(private / steps)
    return statistics.median(plain_times), statistics.median(dp_times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    quiet_libraries()
    print("| model | LoRA target | plain step (s) | DP-SGD step (s) | DP / plain |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        for target in TARGETS:
            plain, private = bench(name, target, args.steps, args.repeats, args.batch)
            print(f"| {name} | {target} | {plain:.3f} | {private:.3f} | {private / plain:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
