"""Config sections ``compression.*`` and ``communication.*``: what travels and how much may."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedtune.config.fields import require


@dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    """``compression.*``: how updates travel (see README, "Compression and communication budget")."""

    uplink: Literal["none", "float32", "int16", "int8", "int4", "topk"] = "none"
    """Client -> server delta: ``none`` or ``float32`` (lossless float32; every message's arrays
    travel packed into one array plus an index), ``int16`` / ``int8`` / ``int4`` (blockwise absmax
    scale, stochastic rounding), or ``topk`` (the largest ``compression.topk-fraction`` of each
    array, error feedback at the client)."""
    downlink: Literal["none", "float32", "int16", "int8"] = "none"
    """Server -> client global adapter (``none`` = ``float32``, sent at each site's LoRA rank); when
    quantized, the dequantized adapter becomes the global one, so the server and every client hold
    exactly the same values."""
    block_size: int = 256
    """Values per quantization block (one float32 scale each): int8 costs 1 + 4 / block bytes a value."""
    topk_fraction: float = 0.1
    """Share of each array's entries ``topk`` sends (at least one)."""

    def __post_init__(self) -> None:
        require(self.block_size >= 1, "compression.block-size", f"must be >= 1, got {self.block_size}.")
        require(
            0 < self.topk_fraction <= 1,
            "compression.topk-fraction",
            f"must be in (0, 1], got {self.topk_fraction}.",
        )


@dataclass(frozen=True, kw_only=True)
class CommunicationConfig:
    """``communication.*``: the run's traffic budget (FlowerTune's rule, enforced)."""

    budget_mb: float = 0.0
    """Most bytes (in MB, 10^6 bytes) up plus down the whole run may move; the server stops before a
    round that would pass it. 0 means no budget."""

    def __post_init__(self) -> None:
        require(
            math.isfinite(self.budget_mb) and self.budget_mb >= 0,
            "communication.budget-mb",
            f"must be >= 0 (0 = no budget), got {self.budget_mb}.",
        )
