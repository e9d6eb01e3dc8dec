"""Checks every client reply before it can touch the global adapter."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from flwr.app import Message

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import UpdateRejected
from fedtune.model.lora import pad_rank, rank_of, rank_slice, sent_keys
from fedtune.strategies.kernels import sum_of_squares
from fedtune.wire import keys
from fedtune.wire.codec import Scheme
from fedtune.wire.records import decode


def validate_delta(delta: Arrays, reference: Arrays, max_norm: float) -> float:
    """``delta``'s L2 norm, if it matches ``reference``'s keys, shapes and dtypes, is finite, and
    its norm is at most ``max_norm`` (0 = no bound); raise UpdateRejected with the reason otherwise.
    """
    missing = sorted(set(reference) - set(delta))
    extra = sorted(set(delta) - set(reference))
    if missing:
        raise UpdateRejected(f"missing {len(missing)} adapter key(s), e.g. {missing[0]!r}")
    if extra:
        raise UpdateRejected(f"{len(extra)} unexpected key(s), e.g. {extra[0]!r}")
    squares = 0.0
    for key, ref in reference.items():
        value = delta[key]
        if value.shape != ref.shape:
            raise UpdateRejected(f"{key!r} has shape {value.shape}, expected {ref.shape}")
        if value.dtype != ref.dtype:
            raise UpdateRejected(f"{key!r} has dtype {value.dtype}, expected {ref.dtype}")
        # One pass: the sum is non-finite iff some entry is (or the float32 sum overflowed).
        part = sum_of_squares(value)
        if not math.isfinite(part):
            raise UpdateRejected(f"{key!r} holds NaN or Inf (or its norm overflows float32)")
        squares += part
    norm = math.sqrt(squares)
    if max_norm > 0 and norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.4g} exceeds server.max-update-norm {max_norm:.4g}")
    return norm


def rank_ok(rank: Any, full_rank: int) -> TypeGuard[int]:
    """A site's reported LoRA rank: 1..the global rank, or 0 when the global state has no LoRA
    matrices (``peft.method`` other than lora)."""
    if not isinstance(rank, int) or isinstance(rank, bool):
        return False
    return 1 <= rank <= full_rank if full_rank else rank == 0


def rank_range(full_rank: int) -> str:
    """What :func:`rank_ok` accepts, in words."""
    return f"1..{full_rank}" if full_rank else "0 (the run's `peft.method` has no LoRA rank)"


@dataclass(frozen=True)
class Accepted:
    """A reply that passed validation, ready for the aggregator."""

    delta: Arrays
    """At the global rank (zero-padded when the site trained at a lower one)."""
    weight: float
    masks: Arrays | None
    """Which entries a lower-rank site trained (1) or not (0); None at the global rank."""
    train_loss: float
    rank: int
    norm: float
    """L2 norm of the delta as sent."""
    metrics: Mapping[str, Any]
    """The reply's metrics (privacy fields among them)."""


def expected_keys(global_arrays: Arrays, cfg: RunConfig) -> Arrays:
    """The part of the global adapter clients train and send (only B under FFA-LoRA)."""
    return {k: global_arrays[k] for k in sent_keys(global_arrays, cfg.lora.freeze_a)}


def accept_reply(reply: Message, cfg: RunConfig, global_arrays: Arrays) -> Accepted:
    """Check one train reply end to end; raise UpdateRejected naming the reason."""
    if reply.has_error():
        raise UpdateRejected(f"client error: {reply.error.reason}")
    if keys.DELTA not in reply.content.array_records:
        raise UpdateRejected(f"reply has no '{keys.DELTA}' record")
    metrics: Mapping[str, Any] = reply.content.metric_records.get(keys.METRICS, {})
    examples = metrics.get(keys.NUM_EXAMPLES)
    if not isinstance(examples, int | float) or isinstance(examples, bool) or not examples >= 1:
        raise UpdateRejected(f"'{keys.NUM_EXAMPLES}' missing or < 1")
    expected = expected_keys(global_arrays, cfg)
    full_rank = rank_of(global_arrays) or 0
    rank = metrics.get(keys.LORA_RANK, full_rank)
    if not rank_ok(rank, full_rank):
        raise UpdateRejected(f"'{keys.LORA_RANK}' = {rank!r} is outside {rank_range(full_rank)}")
    reference = rank_slice(expected, rank) if full_rank else expected
    scheme = Scheme.of(cfg.compression, "uplink")
    delta = decode(reply.content, keys.DELTA, scheme, {k: v.shape for k, v in reference.items()})
    norm = validate_delta(delta, reference, cfg.server.max_update_norm)
    masks = None
    if rank < full_rank:
        delta, masks = pad_rank(delta, expected)
    loss = metrics.get(keys.TRAIN_LOSS, math.nan)
    return Accepted(
        delta=delta,
        weight=float(examples) if cfg.strategy.weighting == "examples" else 1.0,
        masks=masks,
        train_loss=float(loss) if isinstance(loss, int | float) else math.nan,
        rank=rank,
        norm=norm,
        metrics=metrics,
    )
