"""Live experiment tracking (``report.to``): each round's ``metrics.jsonl`` row goes to TensorBoard, MLflow and/or
Weights & Biases, the config once as hyperparameters, and (MLflow) the final adapter and ``summary.json``.

One module per tracker behind :class:`~fedtune.server.tracking.base.Tracker`, registered in ``TRACKERS`` by
its ``report.to`` name; every one writes under OUT by default, so a run never needs the network.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.config.report import ALL
from fedtune.core.errors import ConfigError
from fedtune.server.tracking import to_mlflow, to_tensorboard, to_wandb
from fedtune.server.tracking.base import TRACKERS, Tracker, TrackerKind, scalars

log = logging.getLogger(__name__)

__all__ = [
    "TRACKERS",
    "Tracker",
    "TrackerKind",
    "Tracking",
    "chosen",
    "scalars",
    "to_mlflow",
    "to_tensorboard",
    "to_wandb",
]


def installed(name: str) -> bool:
    """Whether tracker ``name``'s package can be imported."""
    return importlib.util.find_spec(TRACKERS.get(name).package) is not None


def chosen(cfg: RunConfig) -> list[str]:
    """The trackers ``report.to`` names (``all``: every installed one); ConfigError, one line, for a
    named tracker whose package is missing. Run it before round 1."""
    names = cfg.report.names()
    if names == [ALL]:
        return [n for n in TRACKERS.names() if installed(n)]
    for name in names:
        if not installed(name):
            package = TRACKERS.get(name).package
            raise ConfigError(
                f"`report.to` = {name} needs the `{package}` package: pip install 'fedtune[tracking]' "
                f"(or pip install {package})."
            )
    return names


class Tracking:
    """The run's trackers together: opened before round 1, fed each ``metrics.jsonl`` row, closed at the end."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.names = chosen(cfg)
        self.trackers: list[Tracker] = [TRACKERS.get(n).open(out, out.name) for n in self.names]
        for tracker in self.trackers:
            tracker.start(cfg.to_flat())
        if self.names:
            log.info("Tracking each round with %s (report.to)", ", ".join(self.names))

    def row(self, row: Mapping[str, Any]) -> None:
        """Log one ``metrics.jsonl`` row (its scalars at step ``round``)."""
        values = scalars(row)
        for tracker in self.trackers:
            tracker.log(int(row["round"]), values)

    def finish(self, final: Path | None = None, summary: Path | None = None) -> None:
        """Close every tracker (``final`` and ``summary`` None: the run stopped on an error)."""
        for tracker in self.trackers:
            tracker.finish(final, summary)
        self.trackers = []
