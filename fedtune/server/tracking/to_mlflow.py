"""``report.to = mlflow``: a run in a local store under ``OUT/mlruns`` (an SQLite database, ``mlflow.db``, and
the artifacts beside it: ``mlflow ui --backend-store-uri sqlite:///OUT/mlruns/mlflow.db``), or in
``MLFLOW_TRACKING_URI`` when it is set; the final adapter and ``summary.json`` as artifacts.

MLflow 3 refuses its old file store (``./mlruns`` folders) unless told otherwise, hence the database."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from fedtune.config import Scalar
from fedtune.server.tracking.base import TRACKERS, TrackerKind

STORE = "mlruns"
DATABASE = "mlflow.db"
ARTIFACTS = "artifacts"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
EXPERIMENT = "fedtune"
BATCH = 100  # MLflow's limit on params (and a safe one on metrics) per log_batch call


def store_uri(out: Path) -> str:
    """The local store of run directory ``out``: ``sqlite:///OUT/mlruns/mlflow.db``."""
    return f"sqlite:///{(out / STORE / DATABASE).resolve()}"


class MlflowTracker:
    """An ``MlflowClient`` run (no global state: the fluent API's active run is left alone)."""

    def __init__(self, out: Path, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        store = (out / STORE).resolve()
        store.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or store_uri(out))
        name = os.environ.get(EXPERIMENT_ENV, EXPERIMENT)
        found = self.client.get_experiment_by_name(name)
        experiment = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(name, artifact_location=(store / ARTIFACTS).as_uri())
        )
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id

    def start(self, config: Mapping[str, Scalar]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in config.items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + BATCH])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])

    def finish(self, final: Path | None, summary: Path | None) -> None:
        if final is not None:
            self.client.log_artifacts(self.run_id, str(final), final.name)
        if summary is not None:
            self.client.log_artifact(self.run_id, str(summary))
        self.client.set_terminated(self.run_id, "FINISHED" if final is not None else "FAILED")


TRACKERS.register("mlflow")(TrackerKind("mlflow", MlflowTracker))
