"""Scoring an adapter: mean next-token loss over held-out response tokens."""

from __future__ import annotations

from typing import Any

import torch

from fedtune.data.prompts import Example, collate, token_losses


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
