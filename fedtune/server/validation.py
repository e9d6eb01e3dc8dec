"""Checks every client reply before it can touch the global adapter.

A reply is untrusted input: a malicious but authenticated site can send anything a Flower Message can
hold. Whatever the handling of one reply raises is that node's failure (:func:`refused` gives the
one-line reason), never the server's; the checks here make sure nothing unchecked reaches an aggregate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import FedtuneError, UpdateRejected
from fedtune.model.lora import pad_rank, rank_of, rank_slice
from fedtune.model.share import sent_keys
from fedtune.strategies.kernels import sum_of_squares
from fedtune.wire import keys
from fedtune.wire.codec import Scheme
from fedtune.wire.records import decode

log = logging.getLogger(__name__)

MAX_EXAMPLES = 10**9
"""Most examples a site may report: far above any fine-tuning set, and small enough that an example
weight times a delta entry that passed the finite-norm check (|x| < 2e19) stays finite in float32."""
MAX_REASON = 300
"""Characters of a failure reason kept in the log and ``metrics.jsonl`` (a reply's values can be huge)."""
TRAIN_RECORDS: dict[str, type] = {keys.DELTA: ArrayRecord, keys.METRICS: MetricRecord, keys.WIRE: ConfigRecord}
"""The records a train reply may hold (``wire``: the index of a compressed delta)."""


def refused(exc: BaseException, what: str = "malformed reply") -> str:
    """One line saying why a reply was refused: a fedtune error's own message, anything else's type and
    message after ``what`` (its traceback goes to the DEBUG log: a check that crashed on a reply is worth
    a look)."""
    if isinstance(exc, FedtuneError):
        text = str(exc)
    else:
        log.debug("a reply's handling raised %s", type(exc).__name__, exc_info=exc)
        text = f"{what} ({type(exc).__name__}: {exc})"
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def check_records(content: RecordDict, allowed: Mapping[str, type]) -> None:
    """Refuse a reply that holds a record its message type does not define, or one of the wrong kind."""
    for name, record in content.items():
        kind = allowed.get(name)
        if kind is None:
            raise UpdateRejected(f"unexpected record {name!r}; a reply may hold {sorted(allowed)}")
        if not isinstance(record, kind):
            raise UpdateRejected(f"record {name!r} is a {type(record).__name__}, expected a {kind.__name__}")


def example_count(metrics: Mapping[str, Any], key: str = keys.NUM_EXAMPLES) -> int:
    """The reply's ``num-examples`` (or another count ``key``): a whole number in 1..``MAX_EXAMPLES``
    (it weights the site's update or metrics)."""
    n = metrics.get(key)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_EXAMPLES:
        raise UpdateRejected(f"'{key}' must be a whole number in 1..{MAX_EXAMPLES}, got {n!r}")
    return n


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def reported_epsilon(metrics: Mapping[str, Any]) -> float | None:
    """The epsilon a dp-sgd site reports having spent (None if absent): a number >= 0. Infinity is
    accepted, since it is a true statement a site can make about its own spend; NaN is not."""
    eps = metrics.get(keys.EPSILON)
    if eps is None:
        return None
    if not _real(eps) or math.isnan(eps) or eps < 0:
        raise UpdateRejected(f"'{keys.EPSILON}' must be a number >= 0, got {eps!r}")
    return float(eps)


def reported_loss(metrics: Mapping[str, Any], key: str) -> float:
    """A loss the site reports under ``key``: a finite number, or NaN when it sends none."""
    loss = metrics.get(key)
    if loss is None:
        return math.nan
    if not _real(loss) or not math.isfinite(loss):
        raise UpdateRejected(f"'{key}' must be a finite number, got {loss!r}")
    return float(loss)


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
    epsilon: float | None
    """The epsilon a dp-sgd site reports having spent (checked)."""


def expected_keys(global_arrays: Arrays, cfg: RunConfig) -> Arrays:
    """The part of the global adapter clients send (only B under FFA-LoRA, only A under ``lora.share = a``)."""
    return {k: global_arrays[k] for k in sent_keys(global_arrays, cfg.lora)}


def accept_reply(reply: Message, cfg: RunConfig, global_arrays: Arrays) -> Accepted:
    """Check one train reply end to end; raise UpdateRejected naming the reason."""
    if reply.has_error():
        raise UpdateRejected(f"client error: {reply.error.reason}")
    check_records(reply.content, TRAIN_RECORDS)
    if keys.DELTA not in reply.content.array_records:
        raise UpdateRejected(f"reply has no '{keys.DELTA}' record")
    metrics: Mapping[str, Any] = reply.content.metric_records.get(keys.METRICS, {})
    examples = example_count(metrics)
    loss = reported_loss(metrics, keys.TRAIN_LOSS)
    epsilon = reported_epsilon(metrics)
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
    return Accepted(
        delta=delta,
        weight=float(examples) if cfg.strategy.weighting == "examples" else 1.0,
        masks=masks,
        train_loss=loss,
        rank=rank,
        norm=norm,
        metrics=metrics,
        epsilon=epsilon,
    )
