"""The training loss computes logits only where a response token is scored, and equals the loss
over every position's logits (the plain Hugging Face computation), value and gradient."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedtune.config import DataConfig, LoraSection, ModelConfig
from fedtune.data.loaders import DEMO_TRAIN
from fedtune.data.prompts import IGNORE, collate, token_losses, tokenize
from fedtune.model.adapters import init_adapter, wrap_lora
from fedtune.model.loading import load_base


def test_scored_positions_only_give_the_full_logits_loss_and_gradient(tiny_model: Path) -> None:
    # Prepare: a padded batch of demo examples on the tiny model with a non-zero LoRA update
    loaded = load_base(ModelConfig(name=str(tiny_model)), torch.device("cpu"))
    model = wrap_lora(loaded, LoraSection(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj"))
    init_adapter(model, seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    records = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:6]]
    batch = collate(
        tokenize(records, DataConfig(format="chat", max_seq_len=96), loaded.tokenizer), 0, torch.device("cpu")
    )
    params = [p for p in model.parameters() if p.requires_grad]

    # Execute: the reference over every position, then ours
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    ours, count = token_losses(model, batch)
    grads = torch.autograd.grad(ours, params)

    # Assert
    assert int(count) == int((target != IGNORE).sum()) > 0
    assert (batch["labels"] == IGNORE).any()  # prompts and padding are in the batch
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
