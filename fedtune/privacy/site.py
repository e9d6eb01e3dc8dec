"""A site's own DP-SGD accountant: it persists across rounds, client restarts and server resumes.

The ledger lives in the ClientApp's ``context.state`` (kept by the SuperNode between messages of a
run) and in a file under the site's state directory (node config ``state-dir``), written
atomically after each round, so a restarted client continues its epsilon instead of resetting it.
Both are keyed by the run's id, which survives a server resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedtune.config import RunConfig
from fedtune.core.atomic import write_atomic_file
from fedtune.privacy.accounting import GaussianEvent, noise_multiplier
from fedtune.privacy.ledger import Ledger

STATE_KEY = "fedtune.privacy"


@dataclass
class SiteBudget:
    """One site's sample-level ledger for one run, and the noise multiplier it settled on."""

    ledger: Ledger
    noise_multiplier: float | None = None

    def steps(self) -> int:
        return sum(e.steps for e in self.ledger.events)

    def to_json(self) -> str:
        return json.dumps({"ledger": self.ledger.to_dict(), "noise_multiplier": self.noise_multiplier})

    @classmethod
    def from_json(cls, text: str) -> SiteBudget:
        data = json.loads(text)
        return cls(ledger=Ledger.from_dict(data["ledger"]), noise_multiplier=data.get("noise_multiplier"))


def state_file(state_dir: Path, run_id: str, site_name: str) -> Path:
    """``STATE_DIR/<run id>-<site hash>.json`` (the hash keeps paths out of the name)."""
    digest = hashlib.sha256(site_name.encode()).hexdigest()[:16]
    return state_dir / f"{run_id}-{digest}.json"


def restore(state: RecordDict, path: Path) -> SiteBudget:
    """The site's budget from ``context.state`` or its file, whichever has spent more (a stale
    copy must never lower epsilon); a fresh one if neither exists."""
    found = []
    record = state.config_records.get(STATE_KEY)
    if record is not None and isinstance(record.get("budget"), str):
        found.append(SiteBudget.from_json(str(record["budget"])))
    if path.is_file():
        found.append(SiteBudget.from_json(path.read_text()))
    return max(found, key=SiteBudget.steps, default=SiteBudget(ledger=Ledger()))


def save(budget: SiteBudget, state: RecordDict, path: Path) -> None:
    """Write the budget to ``context.state`` and, atomically, to its file."""
    text = budget.to_json()
    state.config_records[STATE_KEY] = ConfigRecord({"budget": text})
    write_atomic_file(path, lambda tmp: tmp.write_text(text))


@dataclass(frozen=True)
class RoundBudget:
    """What the site may spend this round."""

    event: GaussianEvent
    epsilon_before: float
    epsilon_after: float
    exhausted: bool
    """True if this round would push epsilon past ``privacy.target-epsilon``: the site declines."""


def plan_round(budget: SiteBudget, cfg: RunConfig, sample_rate: float, planned_steps: int) -> RoundBudget:
    """This round's DP-SGD event; the noise multiplier is ``privacy.noise-multiplier`` or, once per
    run, solved from the target for ``planned_steps`` steps at ``sample_rate``."""
    p = cfg.privacy
    if budget.noise_multiplier is None:
        if p.noise_multiplier >= 0:
            budget.noise_multiplier = p.noise_multiplier
        else:
            budget.noise_multiplier = noise_multiplier(
                p.target_epsilon, sample_rate, planned_steps, p.delta, p.accountant
            )
    z = p.noise_multiplier if p.noise_multiplier >= 0 else budget.noise_multiplier
    event = GaussianEvent(z, sample_rate, cfg.train.local_steps)
    before = budget.ledger.epsilon(p.delta, p.accountant)
    after = budget.ledger.epsilon(p.delta, p.accountant, extra=event)
    return RoundBudget(event, before, after, exhausted=p.target_epsilon > 0 and after > p.target_epsilon)
