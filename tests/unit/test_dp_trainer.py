"""DP-SGD at a site: with no noise and no clipping it is plain training, and the per-example clip
bound holds on padded batches (each example's gradient equals its own unpadded gradient)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedtune.client.dp_trainer import DPSettings, train_dp
from fedtune.config import DataConfig, LoraSection, ModelConfig, TrainConfig
from fedtune.data.loaders import DEMO_TRAIN
from fedtune.data.prompts import Example, collate, example_losses, tokenize
from fedtune.model.adapters import adapter_arrays, init_adapter, load_adapter_arrays, set_trainable, wrap_lora
from fedtune.model.loading import load_base


@pytest.fixture(scope="module")
def setup(tiny_model: Path) -> tuple[Any, list[Example]]:
    loaded = load_base(ModelConfig(name=str(tiny_model)), torch.device("cpu"))
    model = wrap_lora(loaded, LoraSection(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj"))
    set_trainable(model, freeze_a=False)
    records = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:12]]
    examples = tokenize(records, DataConfig(format="chat", max_seq_len=256), loaded.tokenizer)
    assert len({len(e.input_ids) for e in examples}) > 3  # batches will be padded
    return model, examples


def test_no_noise_and_a_huge_clip_norm_equal_plain_training(setup: tuple[Any, list[Example]]) -> None:
    model, examples = setup
    init_adapter(model, seed=3)
    set_trainable(model, freeze_a=False)
    start = adapter_arrays(model)
    cfg = TrainConfig(local_steps=3, batch_size=len(examples), lr=1e-2)
    train_dp(
        model,
        examples,
        cfg,
        DPSettings(0.0, 1e6, 1.0, 3),
        pad_id=0,
        desc="dp",
        generator=torch.Generator().manual_seed(0),
    )
    dp_end = adapter_arrays(model)

    load_adapter_arrays(model, start)  # reference: plain AdamW on the mean of per-example losses
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    batch = collate(examples, 0, torch.device("cpu"))  # q = 1: every step sees every example
    for _ in range(3):
        optimizer.zero_grad()
        example_losses(model, batch).mean().backward()
        optimizer.step()
    model.eval()
    plain_end = adapter_arrays(model)
    assert any(np.abs(plain_end[k] - start[k]).max() > 1e-4 for k in start)  # it trained
    for k in start:
        np.testing.assert_allclose(dp_end[k], plain_end[k], atol=1e-6, rtol=0)


def test_auto_precision_trains_in_fp32_under_dp_sgd(
    setup: tuple[Any, list[Example]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a machine where `auto` would mean bf16; record what the attention projections compute in
    from fedtune.model import hardware

    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    assert hardware.resolve_precision("auto", torch.device("cpu")) == "bf16"
    model, examples = setup
    dtypes: set[torch.dtype] = set()
    proj = model.get_base_model().model.layers[0].self_attn.q_proj
    hook = proj.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    dp = DPSettings(1.0, 1.0, 0.5, 2)

    def after(precision: str) -> dict[str, np.ndarray]:
        init_adapter(model, seed=7)
        set_trainable(model, freeze_a=False)
        cfg = TrainConfig(local_steps=2, batch_size=4, lr=1e-3, precision=precision)  # type: ignore[arg-type]
        train_dp(model, examples, cfg, dp, pad_id=0, desc="dp", generator=torch.Generator().manual_seed(2))
        return adapter_arrays(model)

    # Execute
    try:
        auto, fp32 = after("auto"), after("fp32")
    finally:
        hook.remove()

    # Assert: no bf16 compute, and the same update as fp32, bit for bit (same Poisson batches and noise
    # come from the same generator)
    assert dtypes == {torch.float32}
    for k in fp32:
        np.testing.assert_array_equal(auto[k], fp32[k])


def _own_gradients(model: Any, examples: list[Example], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each example's gradient computed alone (no padding), flattened."""
    out = []
    for e in examples:
        model.zero_grad()
        example_losses(model, collate([e], 0, torch.device("cpu"))).sum().backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())  # type: ignore[union-attr]
    model.zero_grad()
    return out


def test_per_example_clip_bound_holds_on_padded_batches(setup: tuple[Any, list[Example]]) -> None:
    model, examples = setup
    init_adapter(model, seed=4)
    set_trainable(model, freeze_a=False)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # B = 0 would make every gradient of A vanish; give B values
        for name, p in model.named_parameters():
            if ".lora_B." in name and p.requires_grad:
                p.normal_(0, 0.1)
    own = _own_gradients(model, examples, params)
    clip_norm = float(torch.stack([g.norm() for g in own]).median())  # about half are clipped

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip_norm,
        expected_batch_size=len(examples),
    )
    gsm.train()  # Opacus captures activations in training mode only
    try:
        example_losses(gsm, collate(examples, 0, torch.device("cpu"))).mean().backward()
        per_example = torch.cat([p.grad_sample.reshape(len(examples), -1) for p in params], dim=1)  # type: ignore[attr-defined]
        for i, g in enumerate(own):  # padding changes nothing about an example's gradient
            torch.testing.assert_close(per_example[i], g, atol=1e-6, rtol=1e-4)
        factors = (clip_norm / (per_example.norm(dim=1) + 1e-6)).clamp(max=1.0)
        assert ((per_example * factors[:, None]).norm(dim=1) <= clip_norm * (1 + 1e-6)).all()
        assert (factors < 1).any() and (factors == 1).any()
        optimizer.clip_and_accumulate()
        summed = torch.cat([p.summed_grad.reshape(-1) for p in params])  # type: ignore[attr-defined]
        reference = sum(g * min(1.0, clip_norm / float(g.norm())) for g in own)
        torch.testing.assert_close(summed, reference, atol=1e-6, rtol=1e-4)
    finally:
        optimizer.zero_grad(set_to_none=True)
        gsm._close()
        model.eval()


def test_virtual_steps_give_the_update_of_the_whole_poisson_batch(setup: tuple[Any, list[Example]]) -> None:
    # Prepare: no noise, a clip norm that binds, the same Poisson batches (same generator, q = 0.5)
    model, examples = setup
    init_adapter(model, seed=5)
    set_trainable(model, freeze_a=False)
    rng = np.random.default_rng(0)  # a non-zero B, as after earlier rounds
    start = {
        k: v + (0.05 * rng.standard_normal(v.shape)).astype(np.float32) if "lora_B" in k else v
        for k, v in adapter_arrays(model).items()
    }
    dp = DPSettings(0.0, 1e-2, 0.5, 3)

    def after(cfg: TrainConfig) -> dict[str, np.ndarray]:
        load_adapter_arrays(model, start)
        train_dp(model, examples, cfg, dp, pad_id=0, desc="dp", generator=torch.Generator().manual_seed(1))
        end = adapter_arrays(model)
        return {k: end[k] - start[k] for k in start}

    # Execute
    whole = after(TrainConfig(local_steps=3, batch_size=6, lr=5e-4))
    chunked = after(TrainConfig(local_steps=3, batch_size=2, grad_accum_steps=3, lr=5e-4))

    # Assert: per-example clipping and the sum do not depend on how the batch is chunked
    assert max(float(np.abs(whole[k]).max()) for k in whole) > 1e-3
    assert max(float(np.abs(whole[k] - chunked[k]).max()) for k in whole) < 1e-6
