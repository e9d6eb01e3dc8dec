"""The tracker interface, its registry, and the scalars a ``metrics.jsonl`` row gives a tracker."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedtune.config import Scalar
from fedtune.core.registry import Registry

NESTED = ("time", "sites_eval")
"""Row fields whose numbers are logged too, as ``time/<part>`` and ``sites_eval/<node>/<metric>``."""


class Tracker(Protocol):
    """One experiment tracker: the config once, one step per round, the run's files at the end."""

    def start(self, config: Mapping[str, Scalar]) -> None:
        """Record the run config as hyperparameters."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record one round's scalars at step ``step`` (the round)."""

    def finish(self, final: Path | None, summary: Path | None) -> None:
        """Close the run; ``final`` (the adapter or model folder) and ``summary`` (``summary.json``) are
        set when the run finished, None when it stopped on an error."""


@dataclass(frozen=True)
class TrackerKind:
    """A registered tracker: the package it needs (what ``pip install`` names) and how to open one."""

    package: str
    """The importable module, also the PyPI name."""
    open: Callable[[Path, str], Tracker]
    """``open(out, run_name)``: a started tracker writing under the run directory ``out``."""


TRACKERS: Registry[TrackerKind] = Registry("report.to")


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of one ``metrics.jsonl`` row, by the row's own key (nested ones as ``a/b/c``),
    without ``round`` (the step). Lists, texts, ``epsilon = "inf"`` and None are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round":
            continue
        if key in NESTED and isinstance(value, Mapping):
            for sub, inner in _flatten(value, key).items():
                out[sub] = inner
        elif _finite(value):
            out[key] = float(value)
    return out


def _flatten(value: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, inner in value.items():
        name = f"{prefix}/{key}"
        if isinstance(inner, Mapping):
            out.update(_flatten(inner, name))
        elif _finite(inner):
            out[name] = float(inner)
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
