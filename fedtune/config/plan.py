"""The round plan: different settings for different round ranges, on top of the base config.

A plan entry is any config key behind ``plan.<range>.``, in the same flat TOML table:

    [tool.flwr.app.config]
    strategy.name = "fedavg"                    # rounds without an entry use the base value
    plan."4-20".strategy.name = "fedadam"       # rounds 4..20
    plan."4-20".server.fraction-train = 0.3
    plan."10-".train.lr = 1e-4                  # round 10 to the end
    plan."3".eval.federated = false             # round 3 only

(Flower flattens these to ``plan.4-20.strategy.name``; ``--set plan.4-20.strategy.name=fedadam``
gives the same.) Two entries that set the same key for the same round are an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.config.fields import Scalar
from fedtune.config.run import RunConfig, flat_defaults
from fedtune.core.errors import ConfigError

PREFIX = "plan."
# The model, the adapter's shape and the data stay fixed for a run.
FIXED_PREFIXES = ("model.", "lora.", "peft.", "data.", "simulation.", "output.")
# One budget for the run: its target, delta and accountant cannot change halfway.
FIXED_KEYS = (
    "num-server-rounds",
    "seed",
    "privacy.target-epsilon",
    "privacy.delta",
    "privacy.accountant",
    "communication.budget-mb",
    "server.mode",
)
# What a round trains may change per round: RoLoRA's alternation (its adapter's shape stays fixed).
PER_ROUND_KEYS = ("lora.alternate",)
_RANGE = re.compile(r"^(\d+)(?:-(\d*))?$")


@dataclass(frozen=True)
class Entry:
    """One ``plan.<range>.<key> = value`` line."""

    first: int
    last: int | None  # None: to the end of the run
    key: str
    value: Scalar
    raw: str  # the plan key as the user wrote it

    def covers(self, rnd: int) -> bool:
        return self.first <= rnd and (self.last is None or rnd <= self.last)

    def label(self) -> str:
        if self.last is None:
            return f"rounds {self.first}-"
        return f"round {self.first}" if self.first == self.last else f"rounds {self.first}-{self.last}"


def _parse_entry(raw: str, value: Any) -> Entry:
    rest = raw[len(PREFIX) :]
    span, _, key = rest.partition(".")
    match = _RANGE.match(span)
    if not match or not key:
        raise ConfigError(f"`{raw}`: plan keys have the form plan.<N|N-M|N->.<config key>.")
    first = int(match.group(1))
    last = None if match.group(2) == "" else int(match.group(2) or first)
    if first < 1 or (last is not None and last < first):
        raise ConfigError(f"`{raw}`: round range {span!r} is empty or starts below 1.")
    if key not in flat_defaults():
        raise ConfigError(f"`{raw}`: unknown config key `{key}`.")
    if (key.startswith(FIXED_PREFIXES) and key not in PER_ROUND_KEYS) or key in FIXED_KEYS:
        raise ConfigError(f"`{raw}`: `{key}` is fixed for the whole run and cannot change per round.")
    return Entry(first=first, last=last, key=key, value=value, raw=raw)


@dataclass(frozen=True)
class Plan:
    """The base config plus per-round-range entries; ``for_round`` gives one round's config."""

    base: RunConfig
    entries: tuple[Entry, ...] = ()

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> Plan:
        """Split ``plan.*`` keys from the rest, validate both, and every round's config."""
        entries = tuple(_parse_entry(k, v) for k, v in flat.items() if k.startswith(PREFIX))
        base = RunConfig.from_flat({k: v for k, v in flat.items() if not k.startswith(PREFIX)})
        plan = cls(base=base, entries=entries)
        plan.validate()
        return plan

    def to_flat(self) -> dict[str, Scalar]:
        """Base keys plus plan keys: what ``from_flat`` reads back."""
        return {**self.base.to_flat(), **{e.raw: e.value for e in self.entries}}

    def override(self, changes: Mapping[str, Any]) -> Plan:
        """The same plan over a base config with flat ``changes``."""
        return Plan.from_flat({**self.to_flat(), **changes})

    def for_round(self, rnd: int) -> RunConfig:
        """The config round ``rnd`` runs with."""
        changes = {e.key: e.value for e in self.entries if e.covers(rnd)}
        cfg = self.base.override(changes) if changes else self.base
        if not cfg.eval.generates_in(rnd, self.base.num_server_rounds):  # eval.task-metrics-every
            cfg = cfg.override({"eval.metrics": cfg.eval.without_generation()})
        cfg = evaluated_in(cfg, rnd)
        phase = cfg.lora.phase(rnd)  # RoLoRA: the factor round `rnd` trains
        return cfg.override(phase) if phase else cfg

    def rounds(self) -> Iterator[tuple[int, RunConfig]]:
        """Each round's number and config, round 1 first: the one walk over the plan that checks,
        accounting and reports share."""
        for rnd in range(1, self.base.num_server_rounds + 1):
            yield rnd, self.for_round(rnd)

    def configs(self) -> list[RunConfig]:
        """Each round's config, round 1 first."""
        return [cfg for _, cfg in self.rounds()]

    def spec(self, rnd: int) -> dict[str, Scalar]:
        """What ``metrics.jsonl`` records of round ``rnd``'s spec: its strategy and plan changes,
        ``eval.metrics`` where ``eval.task-metrics-every`` leaves the generated metrics out, and
        ``eval.federated`` where ``eval.federated-every`` skips the sites' evaluation."""
        cfg = self.for_round(rnd)
        core: dict[str, Scalar] = {
            "strategy.name": cfg.strategy.name,
            "privacy.mechanism": cfg.privacy.mechanism,
            "secagg.protocol": cfg.secagg.protocol,
        }
        changes = self._changes(rnd)
        planned = self.base.override(changes) if changes else self.base
        if cfg.eval.metrics != planned.eval.metrics:
            changes["eval.metrics"] = cfg.eval.metrics
        if cfg.eval.federated != planned.eval.federated:
            changes["eval.federated"] = cfg.eval.federated
        return {**core, **changes}

    def validate(self) -> None:
        """Raise one ConfigError listing every bad round range and key."""
        problems: list[str] = []
        rounds = self.base.num_server_rounds
        for entry in self.entries:
            if entry.first > rounds:
                problems.append(f"`{entry.raw}` starts after the last round ({rounds}).")
            try:
                self.base.override({entry.key: entry.value})
            except ConfigError as exc:
                problems.append(f"{entry.label()}: {exc}")
        for i, a in enumerate(self.entries):
            for b in self.entries[i + 1 :]:
                overlap = max(a.first, b.first) <= min(a.last or rounds, b.last or rounds)
                if a.key == b.key and overlap:
                    problems.append(f"`{a.raw}` and `{b.raw}` both set `{a.key}` for the same rounds.")
        if not problems:
            problems += [f"round {r}: {exc}" for r, exc in self._round_errors()]
        if problems:
            raise ConfigError(" ".join(problems))

    def _round_errors(self) -> list[tuple[int, ConfigError]]:
        errors = []
        for rnd in range(1, self.base.num_server_rounds + 1):
            try:
                self.for_round(rnd)
            except ConfigError as exc:
                errors.append((rnd, exc))
        return errors

    def table(self) -> list[tuple[str, str]]:
        """(rounds, settings that differ from the base) per stretch of identical rounds."""
        rows: list[tuple[str, str]] = []
        start, current = 1, self._changes(1)
        for rnd in range(2, self.base.num_server_rounds + 2):
            changes = self._changes(rnd) if rnd <= self.base.num_server_rounds else None
            if changes != current:
                span = f"{start}" if start == rnd - 1 else f"{start}-{rnd - 1}"
                rows.append((span, ", ".join(f"{k}={v}" for k, v in current.items()) or "(base)"))
                start, current = rnd, changes or {}
        return rows

    def _changes(self, rnd: int) -> dict[str, Scalar]:
        return {e.key: e.value for e in self.entries if e.covers(rnd)}


def evaluated_in(cfg: RunConfig, rnd: int) -> RunConfig:
    """``cfg`` with ``eval.federated`` off in a round that ``eval.federated-every`` skips (round 0, the
    base model's evaluation, included)."""
    if cfg.eval.federated is False or cfg.eval.federates_in(rnd, cfg.num_server_rounds):
        return cfg
    return cfg.override({"eval.federated": False})


def group_rounds(problems: list[tuple[int, str]]) -> list[str]:
    """Merge per-round problems into 'rounds A-B: problem' lines, consecutive rounds together."""
    by_text: dict[str, list[int]] = {}
    for rnd, text in problems:
        by_text.setdefault(text, []).append(rnd)
    lines = []
    for text, rounds in by_text.items():
        spans, start, prev = [], rounds[0], rounds[0]
        for r in [*rounds[1:], None]:
            if r is not None and r == prev + 1:
                prev = r
                continue
            spans.append(f"round {start}" if start == prev else f"rounds {start}-{prev}")
            if r is not None:
                start = prev = r
        lines.append(f"{', '.join(spans)}: {text}")
    return lines


def from_run_config(run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Plan:
    """The Plan a ServerApp runs: Flower's run_config, then ``overrides``, plan entries split off."""
    return Plan.from_flat({**dict(run_config), **dict(overrides or {})})
