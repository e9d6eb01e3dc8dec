"""The privacy ledger: the events one guarantee has spent, and epsilon from Opacus's accountants.

One ledger holds one guarantee: user-level for the federation (the server's, for ``central`` and
``local``), or sample-level at one site (each site's own, for ``dp-sgd``). Rounds that released
something without noise are kept too: after one of them epsilon is infinite, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtune.privacy.accounting import Accountant, Event, GaussianEvent, epsilon
from fedtune.privacy.skellam import SkellamEvent


@dataclass
class Ledger:
    """Events in release order; consecutive identical mechanisms are merged (composition is
    additive in both RDP and PRV, so this changes no epsilon)."""

    events: list[Event] = field(default_factory=list)
    unprotected: list[int] = field(default_factory=list)
    """Rounds whose release carried no noise (their guarantee is infinite)."""

    def add(self, event: Event) -> None:
        if event.steps <= 0:
            return
        last = self.events[-1] if self.events else None
        if isinstance(last, SkellamEvent) and last.same_mechanism(event):
            self.events[-1] = SkellamEvent(last.l1, last.l2, last.mu, last.steps + event.steps)
        elif (
            isinstance(last, GaussianEvent)
            and isinstance(event, GaussianEvent)
            and (last.noise_multiplier, last.sample_rate) == (event.noise_multiplier, event.sample_rate)
        ):
            self.events[-1] = GaussianEvent(last.noise_multiplier, last.sample_rate, last.steps + event.steps)
        else:
            self.events.append(event)

    def add_unprotected(self, rnd: int) -> None:
        if rnd not in self.unprotected:
            self.unprotected.append(rnd)

    def epsilon(self, delta: float, kind: Accountant, extra: Event | None = None) -> float:
        """Epsilon so far at ``delta`` (with ``extra`` released next, for a look-ahead)."""
        if self.unprotected:
            return math.inf
        return epsilon([*self.events, *([extra] if extra else [])], delta, kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": [_event_to_json(e) for e in self.events],
            "unprotected": list(self.unprotected),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ledger:
        return cls(
            events=[_event_from_json(e) for e in data.get("events", [])],
            unprotected=[int(r) for r in data.get("unprotected", [])],
        )


def _event_to_json(e: Event) -> Any:
    """A Gaussian event as [z, q, steps] (the original format), a Skellam one as {"skellam": [...]}."""
    if isinstance(e, SkellamEvent):
        return {"skellam": [e.l1, e.l2, e.mu, e.steps]}
    return [e.noise_multiplier, e.sample_rate, e.steps]


def _event_from_json(data: Any) -> Event:
    if isinstance(data, Mapping):
        l1, l2, mu, steps = data["skellam"]
        return SkellamEvent(float(l1), float(l2), float(mu), int(steps))
    z, q, n = data
    return GaussianEvent(float(z), float(q), int(n))


def solve_noise(
    events_for: Callable[[float], list[Event]],
    target_epsilon: float,
    delta: float,
    kind: Accountant,
    *,
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier z whose events ``events_for(z)`` stay within
    ``target_epsilon`` (to a relative ``tolerance``, as Opacus's ``get_noise_multiplier``): a
    bisection over the accountant that also works for events whose sample rates differ."""
    low, high = 0.0, 10.0
    while epsilon(events_for(high), delta, kind) > target_epsilon:
        high *= 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon}")
    while True:
        mid = (low + high) / 2
        eps = epsilon(events_for(mid), delta, kind)
        if eps > target_epsilon:
            low = mid
        else:
            high = mid
            if target_epsilon - eps < tolerance * target_epsilon:
                return high
        if high - low < 1e-9:
            return high
