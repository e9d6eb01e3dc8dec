"""Prompt formats (Alpaca, chat template) and tokenization with labels on response tokens only."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.config import DataConfig
from fedtune.core.errors import ConfigError
from fedtune.data.truncation import TruncationCounts, fit, generation_prompt

IGNORE = -100  # label value the loss skips (prompt and padding tokens)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def check_format(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, model_name: str) -> None:
    """Refuse the chat format for a tokenizer that has no chat template."""
    if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f'`data.format` = "chat" needs a tokenizer with a chat template, and the one of '
            f'{model_name} has none; use data.format = "alpaca".'
        )


def render_prompt(record: Mapping[str, Any], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt text (everything before the response) for one record."""
    instruction = str(record.get(cfg.instruction_field) or "").strip()
    extra = str(record.get(cfg.input_field) or "").strip()
    if cfg.format == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
        return template.format(instruction=instruction, input=extra)
    content = f"{instruction}\n\n{extra}" if extra else instruction
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return str(text)


def response_text(record: Mapping[str, Any], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """The response text the loss covers, ending with the end-of-turn token."""
    answer = str(record.get(cfg.output_field) or "").strip()
    return answer + (tokenizer.eos_token or "")


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``labels`` is IGNORE on prompt tokens."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    """True when prompt and response were longer than ``data.max-seq-len`` and got cut
    (``data.truncation``)."""


@dataclass(frozen=True)
class Tokenized:
    """Records tokenized under ``data.truncation``: the examples kept, their records (same order),
    and what truncation did."""

    examples: list[Example]
    records: list[dict[str, Any]]
    counts: TruncationCounts


def tokenize_counted(
    records: Iterable[Mapping[str, Any]], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> Tokenized:
    """Tokenize prompt and response separately so the label mask is exact, then fit each example
    into ``data.max-seq-len`` as ``data.truncation`` says (``fedtune.data.truncation``)."""
    out: list[Example] = []
    kept: list[dict[str, Any]] = []
    counts = TruncationCounts()
    for record in records:
        prompt = tokenizer(render_prompt(record, cfg, tokenizer), add_special_tokens=False)["input_ids"]
        answer = tokenizer(response_text(record, cfg, tokenizer), add_special_tokens=False)["input_ids"]
        fitted = fit(list(prompt), list(answer), cfg.max_seq_len, cfg.truncation)
        counts.add(fitted, len(answer), cfg.max_seq_len)
        if fitted.kept:
            ids = fitted.prompt + fitted.answer
            labels = [IGNORE] * len(fitted.prompt) + fitted.answer
            out.append(Example(input_ids=ids, labels=labels, truncated=fitted.status != "fits"))
            kept.append(dict(record))
    return Tokenized(out, kept, counts)


def tokenize(
    records: Iterable[Mapping[str, Any]], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> list[Example]:
    """The examples :func:`tokenize_counted` keeps."""
    return tokenize_counted(records, cfg, tokenizer).examples


def prompt_ids(
    record: Mapping[str, Any], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> list[int]:
    """The prompt token ids a model generates its answer from, cut as ``data.truncation`` says."""
    ids = tokenizer(render_prompt(record, cfg, tokenizer), add_special_tokens=False)["input_ids"]
    return generation_prompt(list(ids), cfg.max_seq_len, max_new_tokens, cfg.truncation)


def collate(batch: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label IGNORE."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over response tokens, and how many tokens it covers.

    Only the positions whose next token is scored in some example of the batch get logits
    (``logits_to_keep``): the vocabulary projection and the softmax over prompt and padding
    positions, most of a batch, are never computed. The loss is the same.
    """
    target = batch["labels"][:, 1:]  # (B, T-1)
    keep = (target != IGNORE).any(dim=0).nonzero().squeeze(1)  # (K,) positions t scored at t + 1
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _keeps_logits(model):
        # Prompt tuning prepends virtual tokens, so position t of the batch is t + n in the model.
        shifted = model(**inputs, logits_to_keep=keep + _virtual_tokens(model)).logits.float()  # (B, K, V)
        target = target[:, keep]  # (B, K)
    else:  # a model class without ``logits_to_keep``: every position
        shifted = _logits(model, batch)[:, :-1, :].float()  # (B, T-1, V)
    loss = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, (target != IGNORE).sum()


def example_losses(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean next-token cross-entropy over its own response tokens, shape (B,).

    Unlike :func:`token_losses`, one example's value depends on that example alone, however the
    batch is padded: what DP-SGD's per-example clipping needs.
    """
    shifted = _logits(model, batch)[:, :-1, :].float()  # (B, T-1, V)
    target = batch["labels"][:, 1:]  # (B, T-1)
    per_token = torch.nn.functional.cross_entropy(
        shifted.transpose(1, 2), target, ignore_index=IGNORE, reduction="none"
    )  # (B, T-1); 0 where ignored
    counts = (target != IGNORE).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / counts


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of the batch's own tokens, (B, T, V): prompt tuning prepends its virtual tokens'."""
    logits: torch.Tensor = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -batch["input_ids"].shape[1] :, :]


_KEEPS_LOGITS: dict[type, bool] = {}


def _keeps_logits(model: Any) -> bool:
    """Whether the (PEFT-wrapped) model's forward takes ``logits_to_keep``, decided once per model
    class from its signature, so a TypeError raised inside a forward is never mistaken for it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(base)
    if cls not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return _KEEPS_LOGITS[cls]


def _virtual_tokens(model: Any) -> int:
    """Positions PEFT's prompt tuning prepends to the input (0 for every other model)."""
    config = getattr(getattr(model, "module", model), "active_peft_config", None)  # DDP wraps as .module
    if config is None or not config.is_prompt_learning or config.peft_type == "PREFIX_TUNING":
        return 0
    return int(config.num_virtual_tokens)
