"""``privacy.mechanism = none``: updates are sent and released without noise; no guarantee."""

from __future__ import annotations

from fedtune.privacy.accounting import Event
from fedtune.privacy.ledger import Ledger
from fedtune.privacy.mechanisms.base import Mechanism


class NoDP(Mechanism):
    """No formal guarantee: a released round makes every epsilon of the run infinite."""

    name = "none"
    dp = False

    def charge(
        self, ledger: Ledger, floor: Ledger, target: Event | None, event: Event | None, rnd: int, released: bool
    ) -> None:
        if event is not None:
            ledger.add(event)
        elif released:
            ledger.add_unprotected(rnd)
