"""Local training: FedProx's proximal term, gradient accumulation, checkpointing and bf16 autocast."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtune.client.trainer import response_tokens, shard, train_local
from fedtune.config import DataConfig, LoraSection, ModelConfig, TrainConfig
from fedtune.core.arrays import Arrays
from fedtune.data.loaders import DEMO_TRAIN
from fedtune.data.prompts import Example, collate, token_losses, tokenize
from fedtune.model.adapters import adapter_arrays, init_adapter, load_adapter_arrays, wrap_lora
from fedtune.model.loading import load_base


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


def site_setup(tiny_model: Path, n: int = 24, device: str = "cpu", **model: Any) -> tuple[Any, list[Example], Arrays]:
    """The tiny model (``model.*`` settings ``model``) on ``device`` with a LoRA adapter whose B is
    non-zero (a global adapter after some rounds), and ``n`` demo examples of uneven lengths."""
    loaded = load_base(ModelConfig(name=str(tiny_model), **model), torch.device(device))
    model = wrap_lora(loaded, LoraSection(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj"))
    init_adapter(model, seed=0)
    rng = np.random.default_rng(0)
    start = {
        k: v + (0.05 * rng.standard_normal(v.shape)).astype(np.float32) if "lora_B" in k else v
        for k, v in adapter_arrays(model).items()
    }
    records = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:n]]
    examples = tokenize(records, DataConfig(format="chat", max_seq_len=96), loaded.tokenizer)
    return model, examples, start


def delta_after(model: Any, examples: list[Example], start: Arrays, cfg: TrainConfig, mu: float = 0.0) -> Arrays:
    load_adapter_arrays(model, start)
    train_local(model, examples, cfg, pad_id=0, generator=torch.Generator().manual_seed(3), desc="t", proximal_mu=mu)
    end = adapter_arrays(model)
    return {k: end[k] - start[k] for k in start}


def max_abs(a: Arrays, b: Arrays | None = None) -> float:
    return max(float(np.abs(a[k] - (b[k] if b is not None else 0)).max()) for k in a)


def test_accumulating_micro_batches_equals_one_large_batch(tiny_model: Path) -> None:
    # Prepare: 3 steps of 8 examples, as one batch or as 2 micro-batches of 4 (FedProx makes the
    # gradient's scale matter, not only its direction)
    model, examples, start = site_setup(tiny_model)
    base = {"local_steps": 3, "lr": 5e-3, "max_grad_norm": 0.0}

    # Execute
    one = delta_after(model, examples, start, TrainConfig(batch_size=8, **base), mu=1.0)  # type: ignore[arg-type]
    accumulated = delta_after(model, examples, start, TrainConfig(batch_size=4, grad_accum_steps=2, **base), mu=1.0)  # type: ignore[arg-type]
    smaller = delta_after(model, examples, start, TrainConfig(batch_size=4, **base), mu=1.0)  # type: ignore[arg-type]

    # Assert: the same update to 1e-6, while a plain batch of 4 moves the adapter differently
    assert max_abs(one) > 1e-3
    assert max_abs(one, accumulated) < 1e-6
    assert max_abs(one, smaller) > 1e-4


def test_gradient_checkpointing_recomputes_and_gives_the_same_delta(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: count the forward passes of the first decoder layer's MLP (recomputation calls its
    # forward again, though not its module hooks)
    model, examples, start = site_setup(tiny_model)
    calls: list[int] = []
    mlp = model.get_base_model().model.layers[0].mlp
    forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    cfg = TrainConfig(batch_size=4, local_steps=2, lr=5e-3)

    # Execute
    plain = delta_after(model, examples, start, cfg)
    plain_calls = len(calls)
    checkpointed = delta_after(model, examples, start, dataclasses.replace(cfg, gradient_checkpointing=True))

    # Assert: the MLP ran again in each backward pass, the update is the same, and it is off afterwards
    assert len(calls) - plain_calls == 2 * plain_calls
    assert max_abs(plain) > 1e-3
    assert max_abs(plain, checkpointed) < 1e-5
    assert not model.get_base_model().model.layers[0].gradient_checkpointing


def test_bf16_autocast_on_cpu_computes_in_bf16_and_keeps_the_adapter_fp32(tiny_model: Path) -> None:
    # Prepare: record the dtype the attention projections compute in
    model, examples, start = site_setup(tiny_model)
    dtypes: set[torch.dtype] = set()
    proj = model.get_base_model().model.layers[0].self_attn.q_proj
    hook = proj.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    cfg = TrainConfig(batch_size=4, local_steps=2, lr=5e-3, precision="bf16")

    # Execute
    try:
        delta = delta_after(model, examples, start, cfg)
        reference = delta_after(model, examples, start, dataclasses.replace(cfg, precision="fp32"))
    finally:
        hook.remove()

    # Assert: bf16 compute, fp32 adapter, and an update pointing the same way as the fp32 one
    assert dtypes == {torch.bfloat16, torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    flat, ref = (np.concatenate([d[k].ravel() for k in sorted(d)]) for d in (delta, reference))
    assert np.isfinite(flat).all()
    assert float(flat @ ref / (np.linalg.norm(flat) * np.linalg.norm(ref))) > 0.9


def test_shards_are_disjoint_cover_the_batch_and_differ_by_at_most_one() -> None:
    for size, world in [(5, 2), (8, 3), (4, 4), (7, 1)]:
        # Prepare
        idx = list(range(100, 100 + size))

        # Execute
        parts = [shard(idx, r, world) for r in range(world)]

        # Assert
        assert [i for p in parts for i in p] == idx
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_response_tokens_count_what_the_padded_batch_loss_covers(tiny_model: Path) -> None:
    # Prepare: examples of uneven lengths, right-padded into one batch
    model, examples, _ = site_setup(tiny_model, n=6)

    # Execute
    _, count = token_losses(model, collate(examples, 0, torch.device("cpu")))

    # Assert: the per-example counts the trainer normalizes by add up to the batch's count
    assert len({len(e.input_ids) for e in examples}) > 1
    assert int(count) == sum(response_tokens(e) for e in examples)
