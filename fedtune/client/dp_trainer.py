"""DP-SGD at a site: Opacus per-example clipping and Gaussian noise on the LoRA parameters only.

Opacus's hooks compute per-example gradients for PEFT's LoRA ``nn.Linear`` layers; the frozen base
never gets any. Batches are Poisson-sampled (each example joins a step independently with
probability q), which is what the accountant's amplification assumes. The loss is each example's
own mean over its response tokens, so padding never couples examples and the per-example clip
bound C holds for padded batches too.

Noise and sampling draw from OS entropy, never from ``seed``: whoever knows the run config must not
be able to regenerate the noise.
"""

from __future__ import annotations

import math
import secrets
import sys
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from tqdm import tqdm

from fedtune.client.trainer import TrainResult, shard
from fedtune.config import TrainConfig
from fedtune.data.prompts import Example, collate, example_losses


@dataclass(frozen=True)
class DPSettings:
    """One round of DP-SGD at one site."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    """q: expected batch size over the site's number of examples."""
    steps: int


def sample_rate(num_examples: int, batch_size: int) -> float:
    """q for an expected batch of ``batch_size`` (1 when the site holds fewer examples)."""
    return min(1.0, batch_size / num_examples)


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS's entropy pool."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def train_dp(
    model: Any,
    examples: list[Example],
    cfg: TrainConfig,
    dp: DPSettings,
    *,
    pad_id: int,
    desc: str,
    generator: torch.Generator | None = None,
) -> TrainResult:
    """``dp.steps`` DP-SGD steps (AdamW on the clipped, noised gradient) on the trainable parameters.

    ``generator`` (tests only) fixes the sampling and noise; by default both use OS entropy. The
    returned loss is NaN: a site's clear-text training loss is not covered by the guarantee.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    gen = generator if generator is not None else entropy_generator()
    noise_gen = generator if generator is not None else entropy_generator(device)
    expected = max(1, round(dp.sample_rate * len(examples)))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clip_norm,
        expected_batch_size=expected,
        loss_reduction="mean",
        generator=noise_gen,
    )
    sampler = UniformWithReplacementSampler(
        num_samples=len(examples), sample_rate=dp.sample_rate, generator=gen, steps=dp.steps
    )
    model.train()
    bar = tqdm(
        sampler,
        total=dp.steps,
        desc=f"{desc} (DP-SGD)",
        unit="step",
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 1e9,
        disable=False,
    )
    try:
        for idx in bar:
            optimizer.zero_grad(set_to_none=True)
            # Virtual steps (Opacus's BatchMemoryManager): the Poisson batch is processed in
            # `train.grad-accum-steps` physical chunks; each chunk's per-example gradients are
            # clipped and summed, and only the last chunk adds the noise and steps.
            chunks = [c for c in (shard(idx, j, cfg.grad_accum_steps) for j in range(cfg.grad_accum_steps)) if c]
            for j, chunk in enumerate(chunks or [[]]):
                if chunk:
                    batch = collate([examples[i] for i in chunk], pad_id, device)
                    example_losses(gsm, batch).mean().backward()
                else:  # an empty Poisson batch still takes a (noise-only) step
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                if j < len(chunks) - 1:
                    optimizer.signal_skip_step(do_skip=True)
                    optimizer.step()  # clip and accumulate only
                    optimizer.zero_grad(set_to_none=True)  # keeps the clipped sum: the last step was skipped
                else:
                    optimizer.step()
            bar.set_postfix(batch=len(idx), refresh=False)
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        gsm._close()  # remove the hooks: the resident model serves other rounds and sites
        model.eval()
    return TrainResult(loss=math.nan, steps=dp.steps, examples=len(examples))
