"""The server's half of each secure-aggregation protocol: the round runner registered under the name
``secagg.protocol`` selects (``fedtune.privacy.secagg.protocols`` holds each protocol's facts and rules).
A runner trains one round with the sampled nodes, updates ``state.global_arrays`` unless the round is not
applied, and fills the round's record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from fedtune.config import RunConfig
from fedtune.core.registry import Registry
from fedtune.server.plain_round import train_round
from fedtune.server.record import RoundRecord
from fedtune.server.secagg_round import secagg_round
from fedtune.server.state import GridLike, ServerState


class RoundRunner(Protocol):
    def __call__(
        self,
        cfg: RunConfig,
        grid: GridLike,
        state: ServerState,
        rnd: int,
        nodes: list[int],
        record: RoundRecord,
        extra: Mapping[str, int | str],
        denominator: float,
    ) -> None: ...


RUNNERS: Registry[RoundRunner] = Registry("secagg.protocol")
RUNNERS.register("none")(train_round)
RUNNERS.register("secagg")(secagg_round)
