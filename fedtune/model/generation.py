"""Greedy answers to held-out prompts, and their task metrics (what ``eval.metrics`` asks for)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from fedtune.config import DataConfig, EvalConfig
from fedtune.data.prompts import prompt_ids
from fedtune.model import task_metrics


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    data: DataConfig,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers of ``model`` to each record's prompt, decoded without special tokens.

    Prompts are cut as ``data.truncation`` says (:func:`fedtune.data.prompts.prompt_ids`) and
    left-padded into batches of ``batch_size``, so every answer starts at the same column and
    generation stops once every answer in the batch has ended.
    """
    device = next(model.parameters()).device
    model.eval()
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        rows = [prompt_ids(r, data, tokenizer, max_new_tokens) for r in records[start : start + batch_size]]
        enc = left_pad(rows, int(tokenizer.pad_token_id), device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )  # (B, T_prompt + T_new)
        width = enc["input_ids"].shape[1]
        answers += [str(tokenizer.decode(row[width:], skip_special_tokens=True)).strip() for row in out]
    return answers


def left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Token id rows left-padded into one batch, with the attention mask (0 on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T_prompt)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def generated_names(cfg: EvalConfig) -> list[str]:
    """The metrics in ``eval.metrics`` that need generated answers."""
    return [n for n in cfg.metric_names() if n in task_metrics.GENERATED]


def label_of(record: Mapping[str, Any], data: DataConfig) -> str | None:
    """The record's label (``data.label-field``) as text, or None when there is none."""
    if not data.label_field:
        return None
    value = record.get(data.label_field)
    return None if value is None or str(value).strip() == "" else str(value)


def task_scores(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    data: DataConfig,
    cfg: EvalConfig,
) -> tuple[dict[str, float], int]:
    """The generated-answer metrics ``eval.metrics`` names on the first ``eval.max-generate``
    records, and how many records were generated for (0 when no such metric is asked for)."""
    names = generated_names(cfg)
    chosen = list(records[: cfg.max_generate])
    if not names or not chosen:
        return {}, 0
    answers = generate_answers(
        model, tokenizer, chosen, data, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    references = [str(r.get(data.output_field) or "") for r in chosen]
    labels = [label_of(r, data) for r in chosen]
    return task_metrics.score(names, answers, references, labels), len(chosen)


class TokenCounter(BaseStreamer):
    """A ``generate(streamer=...)`` that calls ``step(n)`` for each batch of n new tokens (a progress bar's
    update); the prompt, which ``generate`` streams first, is not counted."""

    def __init__(self, step: Callable[[int], object]) -> None:
        self.step = step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.step(int(value.numel()))
        self.prompt_seen = True

    def end(self) -> None:
        """Nothing to flush: counts are passed on as they come."""
