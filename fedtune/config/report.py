"""Config section ``report.*``: the experiment trackers each round is logged to (``transformers``' ``report_to``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config.evaluation import parse_names
from fedtune.config.fields import require

TRACKERS = ("tensorboard", "mlflow", "wandb")
"""Every tracker ``report.to`` names; each is one module of ``fedtune.server.tracking``."""
NONE = "none"
ALL = "all"


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """``report.*``: live experiment tracking."""

    to: str = NONE
    """Comma-separated trackers every round is logged to: ``tensorboard`` (``OUT/tensorboard``),
    ``mlflow`` (local store ``OUT/mlruns``, or ``MLFLOW_TRACKING_URI``), ``wandb`` (offline under
    ``OUT/wandb``, unless ``WANDB_MODE`` says otherwise); ``all``: every one whose package is installed;
    ``none``: no tracker. Needs ``pip install 'fedtune[tracking]'``."""

    def __post_init__(self) -> None:
        names = parse_names(self.to)
        unknown = [n for n in names if n not in (*TRACKERS, NONE, ALL)]
        require(
            not unknown,
            "report.to",
            f"has unknown tracker(s) {', '.join(map(repr, unknown))}; known: {', '.join(TRACKERS)}, {ALL}, {NONE}.",
        )
        require(
            len(names) <= 1 or not ({NONE, ALL} & set(names)),
            "report.to",
            f"takes `{NONE}` or `{ALL}` alone, got {self.to!r}.",
        )

    def names(self) -> list[str]:
        """The trackers named (``all`` and ``none`` not expanded: see ``fedtune.server.tracking.chosen``)."""
        return [n for n in parse_names(self.to) if n != NONE]
