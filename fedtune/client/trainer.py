"""Local LoRA training and held-out loss at one site."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from fedtune.config import TrainConfig
from fedtune.data.prompts import Example, collate, token_losses


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced besides the weights."""

    loss: float
    """Mean training loss over the local steps (per response token)."""
    steps: int
    examples: int
    """Training examples the site holds (FedAvg's weight)."""


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """Index batches for ``steps`` steps: seeded shuffles of 0..n-1, one epoch after another."""
    out: list[list[int]] = []
    order: list[int] = []
    while len(out) < steps:
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def train_local(
    model: Any,
    examples: list[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    generator: torch.Generator,
    desc: str,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Run ``train.local-steps`` AdamW steps on the trainable (adapter) parameters.

    With ``proximal_mu`` > 0 the loss gets FedProx's mu/2 * ||w - w_global||^2 over the trainable
    parameters (Li et al. 2020, https://arxiv.org/abs/1812.06127).
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    plan = batches(len(examples), min(cfg.batch_size, len(examples)), cfg.local_steps, generator)
    model.train()
    losses = []
    # Under Ray (no tty) output is forwarded line by line: update the bar in place, show it on close.
    interactive = sys.stderr.isatty()
    bar = tqdm(
        plan,
        desc=desc,
        unit="step",
        file=sys.stderr,
        mininterval=1.0 if interactive else 1e9,
        disable=False,
    )
    for idx in bar:
        batch = collate([examples[i] for i in idx], pad_id, device)
        total, count = token_losses(model, batch)
        loss = total / count.clamp(min=1)
        if anchor:
            loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    model.eval()
    return TrainResult(loss=sum(losses) / len(losses), steps=len(plan), examples=len(examples))


@torch.no_grad()
def heldout_loss(model: Any, examples: list[Example], *, batch_size: int, pad_id: int) -> float:
    """Mean next-token loss over the response tokens of ``examples``."""
    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, device)
        loss, n = token_losses(model, batch)
        total += loss.double().cpu()
        count += int(n)
    return float(total / max(count, 1))
