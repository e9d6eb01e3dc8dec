"""Fitting an example into ``data.max-seq-len`` tokens, as ``data.truncation`` says.

``prompt`` (the default) keeps the response whole and cuts the prompt from the left, the usual
practice in instruction tuning: the end of the prompt, nearest the answer (the question, its
options, the chat template's assistant header), stays. An example whose response alone is longer
than the limit cannot be kept whole and is dropped. ``right`` cuts prompt + response from the
right, which can leave an example with part of its response, or none of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Status = Literal["fits", "prompt_cut", "right_cut", "dropped"]


@dataclass(frozen=True)
class Fitted:
    """One example after truncation (empty ids when it is dropped)."""

    prompt: list[int]
    answer: list[int]
    status: Status

    @property
    def kept(self) -> bool:
        return self.status != "dropped"


def fit(prompt: list[int], answer: list[int], limit: int, mode: str) -> Fitted:
    """Prompt and response token ids cut to ``limit`` tokens together under ``mode``
    (``data.truncation``); ``right`` returns the response as far as it fits."""
    if len(prompt) + len(answer) <= limit:
        return Fitted(prompt, answer, "fits")
    if mode == "right":
        kept = prompt[:limit]
        return Fitted(kept, answer[: limit - len(kept)], "right_cut")
    if len(answer) > limit:
        return Fitted([], [], "dropped")
    room = limit - len(answer)  # >= 0: the prompt's last `room` tokens stay
    return Fitted(prompt[len(prompt) - room :], answer, "prompt_cut")


def generation_prompt(prompt: list[int], limit: int, max_new_tokens: int, mode: str) -> list[int]:
    """The prompt a model generates from: under ``prompt`` its last ``limit - max_new_tokens``
    tokens (but at least ``limit // 2``), so the prompt and the answer fit in ``data.max-seq-len``
    as in training; under ``right`` the whole prompt (cutting its end would cut the assistant
    header), as before ``data.truncation`` existed."""
    if mode != "prompt":
        return prompt
    room = max(limit - max_new_tokens, limit // 2)
    return prompt[-room:] if len(prompt) > room else prompt


@dataclass
class TruncationCounts:
    """How many examples ``data.truncation`` touched (never any content)."""

    too_long: int = 0
    """Prompt + response longer than ``data.max-seq-len``."""
    prompts_cut: int = 0
    """Kept whole by cutting the prompt from the left (``prompt``)."""
    responses_too_long: int = 0
    """Responses alone longer than the limit: dropped under ``prompt``, cut under ``right``."""
    dropped: int = 0
    statuses: list[Status] = field(default_factory=list)

    def add(self, fitted: Fitted, answer_len: int, limit: int) -> None:
        self.statuses.append(fitted.status)
        self.too_long += fitted.status != "fits"
        self.prompts_cut += fitted.status == "prompt_cut"
        self.responses_too_long += answer_len > limit
        self.dropped += fitted.status == "dropped"

    def merge(self, other: TruncationCounts) -> TruncationCounts:
        """The counts of two disjoint sets of examples together."""
        return TruncationCounts(
            too_long=self.too_long + other.too_long,
            prompts_cut=self.prompts_cut + other.prompts_cut,
            responses_too_long=self.responses_too_long + other.responses_too_long,
            dropped=self.dropped + other.dropped,
            statuses=self.statuses + other.statuses,
        )
