"""``report.to = tensorboard``: event files under ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fedtune.config import Scalar
from fedtune.server.tracking.base import TRACKERS, TrackerKind

LOGDIR = "tensorboard"
CONFIG_TAG = "config"


class TensorBoardTracker:
    """A ``torch.utils.tensorboard.SummaryWriter`` (what ``transformers``' TensorBoardCallback uses)."""

    def __init__(self, out: Path, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / LOGDIR / run_name))

    def start(self, config: Mapping[str, Scalar]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text(CONFIG_TAG, json.dumps(dict(config), indent=2))
        # The HParams plugin's records, in this run's own event file (add_hparams would open a new run).
        file_writer = self.writer._get_file_writer()
        for record in hparams(dict(config), {}):
            file_writer.add_summary(record)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def finish(self, final: Path | None, summary: Path | None) -> None:
        self.writer.close()


TRACKERS.register("tensorboard")(TrackerKind("tensorboard", TensorBoardTracker))
