"""Local training: FedProx's proximal term pulls the adapter toward the global one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fedtune.client.trainer import train_local
from fedtune.config import DataConfig, LoraSection, ModelConfig, TrainConfig
from fedtune.data.loaders import DEMO_TRAIN
from fedtune.data.prompts import tokenize
from fedtune.models import adapter_arrays, init_adapter, load_adapter_arrays, load_base, wrap_lora


def distance_after_training(tiny_model: Path, mu: float) -> float:
    loaded = load_base(ModelConfig(name=str(tiny_model)), torch.device("cpu"))
    model = wrap_lora(loaded, LoraSection(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj"))
    init_adapter(model, seed=0)
    start = adapter_arrays(model)
    load_adapter_arrays(model, start)
    records = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:32]]
    examples = tokenize(records, DataConfig(format="chat", max_seq_len=256), loaded.tokenizer)
    assert all(any(t != -100 for t in e.labels) for e in examples)  # responses survive truncation
    cfg = TrainConfig(local_steps=6, batch_size=8, lr=5e-2, max_grad_norm=0.0)
    train_local(model, examples, cfg, pad_id=0, generator=torch.Generator().manual_seed(0), desc="t", proximal_mu=mu)
    end = adapter_arrays(model)
    return float(np.sqrt(sum(np.square(end[k] - start[k]).sum() for k in start)))


def test_proximal_term_keeps_the_update_closer_to_the_global_adapter(tiny_model: Path) -> None:
    free = distance_after_training(tiny_model, mu=0.0)
    held = distance_after_training(tiny_model, mu=100.0)
    assert free > 0
    assert held < 0.5 * free, (held, free)
