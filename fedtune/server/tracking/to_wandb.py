"""``report.to = wandb``: a Weights & Biases run, offline under ``OUT/wandb`` unless ``WANDB_MODE`` says
otherwise (``wandb sync OUT/wandb/offline-run-*`` uploads it later)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.config import Scalar
from fedtune.server.tracking.base import TRACKERS, TrackerKind

PROJECT = "fedtune"


class WandbTracker:
    """A ``wandb.init`` run (``WANDB_PROJECT`` names its project, as with ``transformers``)."""

    def __init__(self, out: Path, run_name: str) -> None:
        import wandb

        out.mkdir(parents=True, exist_ok=True)
        self.run: Any = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_name,
            dir=str(out),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            reinit="create_new",
            settings=wandb.Settings(quiet=True),  # the run's path and `wandb sync` line, not its history
        )

    def start(self, config: Mapping[str, Scalar]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def finish(self, final: Path | None, summary: Path | None) -> None:
        self.run.finish(exit_code=0 if final is not None else 1)


TRACKERS.register("wandb")(TrackerKind("wandb", WandbTracker))
