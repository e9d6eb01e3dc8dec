"""What the round loop keeps between rounds (a checkpoint stores exactly this) and the grid it talks to."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import Message

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.privacy import rounds as privacy
from fedtune.privacy.central import noise_rng
from fedtune.server.record import RoundRecord


class GridLike(Protocol):
    """The part of Flower's ``Grid`` the loop uses."""

    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]: ...


@dataclass
class ServerState:
    """Everything the next round depends on; a checkpoint stores exactly this."""

    round: int
    """Last completed round (0 = only the initial adapter exists)."""
    global_arrays: Arrays
    rng: np.random.Generator
    """Client sampling RNG: seeded by ``seed`` and checkpointed, so a run's samples are reproducible;
    but when a round claims amplification by client sampling (``privacy.rounds.secret_sample``), which
    assumes the sample secret, :func:`run` reseeds it from OS entropy and it is never checkpointed."""
    history: list[RoundRecord] = field(default_factory=list)
    optimizer_states: dict[str, Arrays] = field(default_factory=dict)
    """Server-optimizer state (momentum, Adam moments) by optimizer name, kept across rounds."""
    node_ranks: dict[int, int] = field(default_factory=dict)
    """LoRA rank each node trained at (learned from its replies); it gets that slice next time."""
    run_id: str = ""
    """This fedtune run's id (kept across resumes); sites key their privacy ledgers by it."""
    privacy: privacy.PrivacyState = field(default_factory=privacy.PrivacyState.new)
    noise_rng: np.random.Generator = field(default_factory=noise_rng)
    """Central DP noise: seeded from OS entropy, never from ``seed``, and never checkpointed (its
    state would let anyone holding a checkpoint subtract the noise); a resumed run reseeds it."""
    communication_stopped: str | None = None
    """Why ``communication.budget-mb`` stopped the run, if it did."""
    downlink: tuple[Any, Arrays, dict[str, Any]] | None = None
    """The last compressed downlink (scheme, the global adapter it encodes, its records); not checkpointed."""
    frame_holders: dict[int, str] = field(default_factory=dict)
    """LoRA-SB: the fingerprint of the frame (fixed A and B) each node was last sent, so that its next
    adapter can go without it (``server/frame.py``); not checkpointed, so a resumed run sends it again."""
    hidden: bool = False
    """Who took part stays out of every output and the log (``privacy.rounds.participants_hidden``);
    set by :func:`run` from the plan, not checkpointed."""


Evaluate = Callable[[Arrays, RunConfig], Mapping[str, float]]
"""Centralized evaluation: the round's ``eval.metrics`` of an adapter, by metric name."""
OnRound = Callable[[ServerState, RoundRecord], None]
OnFinal = Callable[[Arrays], None]
"""Told the final global adapter once the last round's centralized evaluation is done (must return at once)."""
