"""``fedtune chat``: greedy answers from a run's model in the run's own prompt format, streamed token by token."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from fedtune.config import DataConfig
from fedtune.data.prompts import render_prompt


class CallbackStreamer(TextStreamer):
    """transformers' ``TextStreamer``, handing each finished piece of text to ``on_text`` instead of print."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


def chat_prompt(text: str, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt the run trained on for a user message: its chat template or its Alpaca template."""
    return render_prompt({data.instruction_field: text}, data, tokenizer)


@torch.no_grad()
def answer(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    data: DataConfig,
    *,
    max_new_tokens: int,
    on_text: Callable[[str], None],
) -> str:
    """Answer one message greedily, streaming the decoded text to ``on_text`` as tokens come; returns it whole."""
    enc = tokenizer(chat_prompt(text, data, tokenizer), add_special_tokens=False, return_tensors="pt")
    enc = enc.to(next(model.parameters()).device)
    pieces: list[str] = []

    def collect(piece: str) -> None:
        pieces.append(piece)
        on_text(piece)

    model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        streamer=CallbackStreamer(tokenizer, collect),
    )
    return "".join(pieces)


def converse(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    lines: Iterable[str],
    data: DataConfig,
    *,
    max_new_tokens: int,
    on_text: Callable[[str], None],
) -> int:
    """Answer each non-blank line on its own (the run trained single-turn prompts); returns how many."""
    count = 0
    for line in lines:
        if line.strip():
            answer(model, tokenizer, line.strip(), data, max_new_tokens=max_new_tokens, on_text=on_text)
            on_text("\n")
            count += 1
    return count
