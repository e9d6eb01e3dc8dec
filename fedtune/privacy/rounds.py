"""The server's side of privacy, round by round: resolve the noise, check the budget before a round,
and record what each round released in the run's one ledger. What differs by mechanism (its events,
its ledger, its rules) is asked of the mechanism object (``privacy/mechanisms/``), never of its name.

Guarantees and their units:

- ``central``: user-level, for the federation. Each round is one subsampled Gaussian release of
  the sum with sensitivity C; with ``server.sampling = poisson`` the client sampling rate q
  amplifies it, with fixed-size sampling fedtune claims no amplification (q = 1).
- ``local``: user-level, for the federation, with the server untrusted. Each client's own noised
  delta is a Gaussian release; changing that client's data moves its delta by up to 2C, so each
  round is accounted as noise multiplier z/2 and no amplification (the server sees who replied).
- ``distributed``: user-level, for the federation, with the server seeing only the noised sum.
  Each client adds a Skellam noise share inside SecAgg+ (``privacy/distributed.py``); each round
  is one Skellam release of the integer sum (``privacy/skellam.py``, RDP accountant) with the noise
  its survivors really added, never less than the target, and no subsampling amplification (q = 1).
  A second ledger, ``floor``, charges every round at the target noise: what still holds when the
  server colludes with clients, as long as dropped plus colluding clients stay within n - m.
- ``dp-sgd``: sample-level, per site. Each site keeps its own ledger (``privacy/site.py``) and
  reports its epsilon; the server records the largest.
- A round with ``none`` releases an un-noised update: every guarantee of the run is infinite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.arrays import Arrays
from fedtune.core.errors import PrivacyBudgetExceeded
from fedtune.privacy.accounting import Event
from fedtune.privacy.ledger import Ledger, solve_noise
from fedtune.privacy.mechanisms import MECHANISMS


def amplified(cfg: RunConfig) -> bool:
    """Whether the round's user-level event counts amplification by client sampling (q < 1).

    Only ``central`` under ``server.sampling = poisson`` does (``local`` and ``distributed`` claim
    q = 1; ``dp-sgd`` samples examples, not clients). The claim holds only while nobody outside the
    server can tell who was sampled: the sample is then drawn from OS entropy and kept out of the
    outputs (``fedtune.server.loop``).
    """
    return MECHANISMS.get(cfg.privacy.mechanism).amplified(cfg)


def secret_sample(plan: Plan) -> bool:
    """Whether some round of ``plan`` claims amplification by client sampling (:func:`amplified`)."""
    return any(amplified(cfg) for cfg in plan.configs())


def participants_hidden(plan: Plan) -> bool:
    """Whether node ids stay out of the run's outputs: the sample is secret and
    ``output.log-participants`` does not ask for them."""
    return secret_sample(plan) and not plan.base.output.log_participants


def federated_eval(plan: Plan, cfg: RunConfig) -> bool:
    """``eval.federated`` of round config ``cfg``: ``auto`` is off when the run uses a DP mechanism."""
    return cfg.eval.federated_on(unit(plan) is not None)


def user_event(cfg: RunConfig, noise_multiplier: float, arrays: Arrays | None = None) -> Event | None:
    """The user-level release one round of ``cfg`` makes, or None if it makes none; for ``distributed``
    the least noise the round can release (its target), which needs the global adapter ``arrays``."""
    return MECHANISMS.get(cfg.privacy.mechanism).user_event(cfg, noise_multiplier, arrays)


def mechanisms(plan: Plan) -> list[str]:
    """Each round's ``privacy.mechanism``, round 1 first."""
    return [cfg.privacy.mechanism for cfg in plan.configs()]


def unit(plan: Plan) -> str | None:
    """The run's DP mechanism family (``central``/``local``/``dp-sgd``), None without DP."""
    used = [m for m in mechanisms(plan) if MECHANISMS.get(m).dp]
    return used[0] if used else None


def solved_noise(plan: Plan, arrays: Arrays | None = None) -> float | None:
    """The noise multiplier for user-level rounds that leave it at -1: the smallest whose planned
    rounds stay within ``privacy.target-epsilon``; None if no round needs one (``arrays``: the
    global adapter, whose size ``distributed`` needs)."""
    dp = [c for c in plan.configs() if MECHANISMS.get(c.privacy.mechanism).user_level]
    if not any(c.privacy.noise_multiplier == -1 for c in dp):
        return None
    p = plan.base.privacy

    def events_for(z: float) -> list[Event]:
        chosen = [(c, z if c.privacy.noise_multiplier == -1 else c.privacy.noise_multiplier) for c in dp]
        return [e for c, zz in chosen if (e := user_event(c, zz, arrays)) is not None]

    return solve_noise(events_for, p.target_epsilon, p.delta, p.accountant)


def projected_epsilon(plan: Plan, solved: float | None, arrays: Arrays | None = None) -> float | None:
    """User-level epsilon after every planned round (at the target noise), None without user-level DP."""
    events = []
    for cfg in plan.configs():
        z = solved if cfg.privacy.noise_multiplier == -1 and solved is not None else cfg.privacy.noise_multiplier
        if (event := user_event(cfg, z, arrays)) is not None:
            events.append(event)
    if not events:
        return None
    p = plan.base.privacy
    return Ledger(events=events).epsilon(p.delta, p.accountant)


def dpsgd_planned_steps(plan: Plan) -> int:
    """Local steps over every ``dp-sgd`` round of the plan: what a site solves its noise for."""
    return sum(c.train.local_steps for c in plan.configs() if MECHANISMS.get(c.privacy.mechanism).site_ledger)


@dataclass
class PrivacyState:
    """The run's privacy state; checkpointed with the adapter."""

    ledger: Ledger
    """User-level events (``central``/``local``/``distributed``: the noise really released) and
    un-noised rounds."""
    site_epsilon: dict[int, float]
    """Sample-level epsilon each ``dp-sgd`` site reported last, by node id."""
    exhausted: list[int]
    """Nodes that answered "budget exhausted"; never sampled again."""
    clip_norm: float | None = None
    """The current C under adaptive clipping."""
    stopped: str | None = None
    """Why the run stopped early, if it did."""
    floor: Ledger = field(default_factory=Ledger)
    """``distributed``: every round at its target noise (the guarantee under collusion, see above)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.to_dict(),
            "site_epsilon": {str(k): v for k, v in self.site_epsilon.items()},
            "exhausted": self.exhausted,
            "clip_norm": self.clip_norm,
            "stopped": self.stopped,
            "floor": self.floor.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyState:
        return cls(
            ledger=Ledger.from_dict(data.get("ledger", {})),
            site_epsilon={int(k): float(v) for k, v in data.get("site_epsilon", {}).items()},
            exhausted=[int(n) for n in data.get("exhausted", [])],
            clip_norm=data.get("clip_norm"),
            stopped=data.get("stopped"),
            floor=Ledger.from_dict(data.get("floor", {})),
        )

    @classmethod
    def new(cls) -> PrivacyState:
        return cls(ledger=Ledger(), site_epsilon={}, exhausted=[])

    def epsilon(self, cfg: RunConfig, family: str | None) -> float | None:
        """Epsilon so far in the run's unit (None without DP)."""
        if family is None:
            return None
        if MECHANISMS.get(family).site_ledger:
            if self.ledger.unprotected:
                return math.inf
            return max(self.site_epsilon.values(), default=0.0)
        return self.ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant)


def round_config(cfg: RunConfig, state: PrivacyState, solved: float | None) -> RunConfig:
    """This round's config with the noise multiplier and clip norm the round actually uses."""
    changes: dict[str, Any] = {}
    mechanism = MECHANISMS.get(cfg.privacy.mechanism)
    if mechanism.user_level and cfg.privacy.noise_multiplier == -1 and solved is not None:
        changes["privacy.noise-multiplier"] = solved
    if mechanism.tunes_clip and cfg.privacy.adaptive_clip and state.clip_norm is not None:
        changes["privacy.clip-norm"] = state.clip_norm
    return cfg.override(changes) if changes else cfg


def check_budget(cfg: RunConfig, state: PrivacyState, rnd: int, arrays: Arrays | None = None) -> Event | None:
    """The user-level event round ``rnd`` would release (at least); raise PrivacyBudgetExceeded if it
    would push epsilon past ``privacy.target-epsilon``. ``distributed`` checks its ``floor`` ledger,
    which is never below the ledger of what was really released."""
    event = user_event(cfg, cfg.privacy.noise_multiplier, arrays)
    target = cfg.privacy.target_epsilon
    if event is None or target <= 0:
        return event
    ledger = MECHANISMS.get(cfg.privacy.mechanism).budget_ledger(state.ledger, state.floor)
    before = ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant)
    after = ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant, extra=event)
    if after > target:
        raise PrivacyBudgetExceeded(
            f"stopped before round {rnd}: its release would raise user-level epsilon from {before:.3f} to "
            f"{after:.3f}, past `privacy.target-epsilon` = {target:g} (delta {cfg.privacy.delta:g})."
        )
    return event
