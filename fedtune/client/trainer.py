"""Local LoRA training and held-out loss at one site."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from fedtune.config import TrainConfig
from fedtune.data.prompts import IGNORE, Example, collate, token_losses
from fedtune.model.hardware import autocast_dtype


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


def response_tokens(example: Example) -> int:
    """Tokens the loss covers in ``example`` (what :func:`token_losses` counts for it in any batch)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE)


def shard(idx: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous, disjoint share of a micro-batch (sizes differ by at most one)."""
    bounds = [len(idx) * r // world for r in range(world + 1)]
    return idx[bounds[rank] : bounds[rank + 1]]


def train_local(
    model: Any,
    examples: list[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    generator: torch.Generator,
    desc: str,
    proximal_mu: float = 0.0,
    rank: int = 0,
    world: int = 1,
) -> TrainResult:
    """Run ``train.local-steps`` AdamW steps on the trainable (adapter) parameters.

    Each step covers ``train.grad-accum-steps`` micro-batches of ``train.batch-size`` examples, and
    its loss is the mean over all response tokens of the step, so accumulating k micro-batches gives
    the update of one batch k times as large. Under data parallelism (``world`` > 1, a process
    group already set up, see ``fedtune.client.parallel``) every rank draws the same batches and
    takes its :func:`shard` of each micro-batch; its summed token loss is scaled by world / (the
    step's token count), so DDP's gradient average is that same mean, even for uneven shards.

    With ``proximal_mu`` > 0 the loss gets FedProx's mu/2 * ||w - w_global||^2 over the trainable
    parameters (Li et al. 2020, https://arxiv.org/abs/1812.06127).
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    accum = cfg.grad_accum_steps
    micro = batches(len(examples), min(cfg.batch_size, len(examples)), cfg.local_steps * accum, generator)
    plan = [micro[s * accum : (s + 1) * accum] for s in range(cfg.local_steps)]
    amp = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    forward = distributed(model, device) if world > 1 else model
    if cfg.gradient_checkpointing:
        checkpointing(model, on=True)
    model.train()
    losses = []
    # Under Ray (no tty) output is forwarded line by line: update the bar in place, show it on close.
    interactive = sys.stdout.isatty()  # progress goes to stdout, warnings and errors to stderr
    bar = tqdm(plan, desc=desc, unit="step", file=sys.stdout, mininterval=1.0 if interactive else 1e9, disable=rank > 0)
    try:
        for step in bar:
            count = max(1, sum(response_tokens(examples[i]) for idx in step for i in idx))
            summed = torch.zeros((), device=device)
            optimizer.zero_grad(set_to_none=True)
            for j, idx in enumerate(step):
                batch = collate([examples[i] for i in shard(idx, rank, world)], pad_id, device)
                # DDP all-reduces on the step's last micro-batch only (gradients accumulate before).
                sync = world == 1 or j == len(step) - 1
                with contextlib.nullcontext() if sync else forward.no_sync():
                    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                        total, _ = token_losses(forward, batch)
                    loss = total * (world / count)
                    if anchor and j == 0:  # every rank adds it once per step: DDP's average keeps it once
                        loss = loss + proximal(params, anchor, proximal_mu)
                    (scaler.scale(loss) if scaler else loss).backward()
                summed += total.detach()
            if world > 1:
                torch.distributed.all_reduce(summed)
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            losses.append(float(summed) / count)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    finally:
        bar.close()
        if cfg.gradient_checkpointing:
            checkpointing(model, on=False)  # the resident model serves other sites and evaluation
        model.eval()
    return TrainResult(loss=sum(losses) / len(losses), steps=len(plan), examples=len(examples))


def proximal(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * ||w - w_global||^2 over the trainable parameters."""
    return mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))  # type: ignore[return-value]


def checkpointing(model: Any, *, on: bool) -> None:
    """Turn activation (gradient) checkpointing of the base model on or off.

    Non-reentrant checkpointing needs no input gradients and works under DDP and on frozen bases.
    transformers >= 5.x names it ``activation_checkpointing_*``; older releases ``gradient_checkpointing_*``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()


def distributed(model: Any, device: torch.device) -> Any:
    """DDP over the already-initialized process group; no initial broadcast (every rank loaded the
    same base and the same global adapter)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, init_sync=False)
