"""Communication: the global adapter as each round sends it, bytes per client, and the byte budget.

The adapter always travels packed (:mod:`fedtune.wire.codec`). Lossless float32
(``compression.downlink`` ``none`` or ``float32``) goes to each site at its own LoRA rank. Under a
quantized downlink the server encodes the global adapter and **adopts the dequantized values as the
global adapter** before sending it (:func:`received_adapter` returns them, the round assigns them),
so the server steps from exactly what the clients received and computed their deltas against.
Re-encoding values that already sit on the quantization grid gives them back (the block's largest
magnitude maps to the top code exactly), so an entry that no round changes does not drift. A
quantized global adapter travels at full rank; a lower-rank site takes its slice after decoding.

Under LoRA-SB the fixed A and B (the frame) go to each node only until it holds them
(:mod:`fedtune.server.frame`); :class:`Downlink` builds each node's records, the cores alone once
the node holds the frame, byte for byte as the full encoding carries them.

The budget (``communication.budget-mb``) is checked before every round against that round's
projected bytes: the sizes of every encoding follow from the shapes and the settings, so the
projection equals what is then sent when every client answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import CommunicationBudgetExceeded
from fedtune.model.lora import rank_of, rank_slice
from fedtune.model.sb import core_keys
from fedtune.model.share import sent_keys
from fedtune.server import frame
from fedtune.server.state import ServerState
from fedtune.wire import keys
from fedtune.wire.codec import Scheme, rng_for
from fedtune.wire.records import decode, encode, encoded_bytes, select_records

log = logging.getLogger(__name__)

MB = 10**6
Records = dict[str, ArrayRecord | MetricRecord | ConfigRecord]


def received_adapter(cfg: RunConfig, state: ServerState, rnd: int) -> Arrays:
    """The global adapter as round ``rnd``'s clients will receive it; the caller adopts it as
    ``state.global_arrays`` before sending, evaluating or stepping from it.

    Under lossless float32 that is ``state.global_arrays`` itself (float32 already). Quantized, it is
    the dequantized full-rank encoding, which is kept in ``state.downlink`` so that
    :func:`adapter_records` sends exactly the records the clients decode to these values.
    """
    scheme = Scheme.of(cfg.compression, "downlink")
    if scheme.lossless:
        return state.global_arrays
    cached = state.downlink
    if cached is not None and cached[0] == scheme and cached[1] is state.global_arrays:
        return state.global_arrays  # already adopted: re-encoding would give it back anyway
    records, _ = encode(state.global_arrays, keys.ADAPTER, scheme, rng_for(cfg.seed, rnd, "server"))
    received = decode(RecordDict(records), keys.ADAPTER, scheme)
    state.downlink = (scheme, received, records)
    return received


def adapter_records(cfg: RunConfig, state: ServerState, rnd: int, rank: int | None) -> Records:
    """The global adapter for a client of LoRA ``rank``: packed float32 at its rank, or under a quantized
    ``compression.downlink`` the full-rank encoding of the adopted :func:`received_adapter`."""
    scheme = Scheme.of(cfg.compression, "downlink")
    if scheme.lossless:
        full = rank_of(state.global_arrays)
        arrays = rank_slice(state.global_arrays, rank) if rank and rank != full else state.global_arrays
        return encode(arrays, keys.ADAPTER, scheme, rng_for(cfg.seed, rnd, "server"))[0]
    cached = state.downlink
    assert cached is not None and cached[0] == scheme and cached[1] is state.global_arrays, "adopt received_adapter"
    return cached[2]


class Downlink:
    """One send's records of the (adopted) global adapter for each node: at the node's rank, and under
    LoRA-SB naming the frame's fingerprint and carrying the frame only to a node not known to hold it
    (which from then on counts as holding it). Built once per send, after :func:`received_adapter`."""

    def __init__(self, cfg: RunConfig, state: ServerState, rnd: int) -> None:
        self.cfg, self.state, self.rnd = cfg, state, rnd
        self.full = rank_of(state.global_arrays)
        self.frame = frame.frame_fingerprint(state.global_arrays)
        self._built: dict[tuple[int | None, bool], Records] = {}

    def records(self, node: int) -> Records:
        """``node``'s records (shared with every node of the same rank and frame status: do not mutate)."""
        rank = self.state.node_ranks.get(node, self.full)
        lean = frame.holds(self.state.frame_holders, node, self.frame)
        if (rank, lean) not in self._built:
            records = adapter_records(self.cfg, self.state, self.rnd, rank)
            if self.frame is not None:
                if lean:  # the cores alone, with exactly the bytes the full encoding gives them
                    records = select_records(records, keys.ADAPTER, core_keys(self.state.global_arrays))
                index = records[keys.WIRE]
                assert isinstance(index, ConfigRecord), "encode() puts the index in a ConfigRecord"
                records = {**records, keys.WIRE: ConfigRecord({**index, keys.FRAME: self.frame})}
            self._built[(rank, lean)] = records
        if not lean:
            frame.note_sent(self.state.frame_holders, node, self.frame)
        return self._built[(rank, lean)]


def _shapes(arrays: Arrays) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in arrays.items()}


def projected_bytes(cfg: RunConfig, state: ServerState, train_nodes: Iterable[int], eval_nodes: Iterable[int]) -> int:
    """Bytes the round will move if every client answers: the adapter down to each trained and
    evaluated client, and each trained client's encoded delta up."""
    down_scheme, up_scheme = Scheme.of(cfg.compression, "downlink"), Scheme.of(cfg.compression, "uplink")
    full = rank_of(state.global_arrays)
    sent = sent_keys(state.global_arrays, cfg.lora)
    fingerprint = frame.frame_fingerprint(state.global_arrays)

    def down(node: int, held: set[int]) -> int:
        rank = state.node_ranks.get(node, full)
        arrays = state.global_arrays
        if down_scheme.lossless and rank and rank != full:
            arrays = rank_slice(arrays, rank)
        if fingerprint is not None and node in held:  # LoRA-SB: the cores alone
            arrays = {k: arrays[k] for k in core_keys(arrays)}
        held.add(node)  # sent the frame now if it lacked it
        return encoded_bytes(_shapes(arrays), down_scheme) + len(fingerprint or "")

    def up(node: int) -> int:
        rank = state.node_ranks.get(node, full)
        arrays = {k: state.global_arrays[k] for k in sent}
        return encoded_bytes(_shapes(rank_slice(arrays, rank) if rank and rank != full else arrays), up_scheme)

    held = {node for node, fp in state.frame_holders.items() if fp == fingerprint}
    return sum(down(n, held) + up(n) for n in train_nodes) + sum(down(n, held) for n in eval_nodes)


def check_budget(cfg: RunConfig, state: ServerState, rnd: int, projected: int) -> None:
    """Raise CommunicationBudgetExceeded if round ``rnd``'s ``projected`` bytes would pass the budget."""
    budget = cfg.communication.budget_mb * MB
    if budget <= 0:
        return
    used = sum(r.bytes_up + r.bytes_down for r in state.history)
    if used + projected > budget:
        raise CommunicationBudgetExceeded(
            f"stopped before round {rnd}: it would move {projected / MB:.3f} MB on top of the {used / MB:.3f} MB "
            f"used so far, past `communication.budget-mb` = {cfg.communication.budget_mb:g}."
        )


def communication_summary(cfg: RunConfig, state: ServerState) -> dict[str, Any]:
    """``summary.json``'s communication section: totals, the budget, and why the run stopped, if it did."""
    up = sum(r.bytes_up for r in state.history)
    down = sum(r.bytes_down for r in state.history)
    return {
        "bytes_up": up,
        "bytes_down": down,
        "budget_mb": cfg.communication.budget_mb or None,
        "used_mb": (up + down) / MB,
        "uplink": cfg.compression.uplink,
        "downlink": cfg.compression.downlink,
        "stopped": state.communication_stopped,
    }
