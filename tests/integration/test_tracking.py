"""Live experiment tracking (``report.to``): one tiny federation on the ``shared`` backend logged to TensorBoard,
MLflow and W&B (offline) at once, each read back with the tool's own reader and compared with ``metrics.jsonl``."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from fedtune.cli import main
from fedtune.server.tracking import scalars
from fedtune.server.tracking.to_mlflow import EXPERIMENT, store_uri


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-round tiny run under central DP (an epsilon per round) with the sites' held-out metrics on."""
    out = tmp_path_factory.mktemp("tracking") / "run"
    argv = ["simulate", "--preset", "tiny", "--out", str(out), "--rounds", "2"]
    for setting in (
        "simulation.backend=shared",
        "report.to=tensorboard,mlflow,wandb",
        "privacy.mechanism=central",
        "strategy.weighting=uniform",
        "privacy.noise-multiplier=0.8",
        "eval.federated=true",
    ):
        argv += ["--set", setting]
    assert main(argv) == 0
    return out


def _expected(out: Path) -> dict[int, dict[str, float]]:
    """Each round's numbers as ``metrics.jsonl`` holds them (nested ones as ``time/...``, ``sites_eval/...``)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {row["round"]: scalars(row) for row in rows}
    # the case under test: losses, epsilon, bytes, the time breakdown and each site's held-out loss
    last = expected[max(expected)]
    assert {"eval_loss_central", "eval_loss_federated", "epsilon", "bytes_up", "bytes_down", "seconds"} <= set(last)
    assert any(k.startswith("time/") for k in last)
    assert sum(k.startswith("sites_eval/") and k.endswith("/eval_loss") for k in last) == 3
    assert last["epsilon"] > 0
    return expected


def test_tensorboard_events_equal_metrics_jsonl(tracked_run: Path) -> None:
    # Prepare
    expected = _expected(tracked_run)
    (logdir,) = (tracked_run / "tensorboard").iterdir()

    # Execute
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()

    # Assert: every number of every row, at its round; the config as text once
    logged: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            logged.setdefault(event.step, {})[tag] = event.value
    assert set(logged) == set(expected)
    for rnd, values in expected.items():
        assert logged[rnd] == pytest.approx(values, rel=1e-6)  # TensorBoard stores float32
    (config_text,) = events.Tensors("config/text_summary")
    config = json.loads(config_text.tensor_proto.string_val[0].decode())
    assert config["report.to"] == "tensorboard,mlflow,wandb" and config["num-server-rounds"] == 2


def test_mlflow_run_equals_metrics_jsonl_and_holds_the_adapter(tracked_run: Path, tmp_path: Path) -> None:
    # Prepare
    expected = _expected(tracked_run)
    summary = json.loads((tracked_run / "summary.json").read_text())
    client = MlflowClient(tracking_uri=store_uri(tracked_run))

    # Execute
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])

    # Assert: every metric's history, the config as params, the adapter and summary.json as artifacts
    assert run.info.status == "FINISHED"
    logged: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            logged.setdefault(metric.step, {})[key] = metric.value
    assert logged == expected
    assert run.data.params == {k: str(v) for k, v in summary["config"].items()}
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    assert json.loads((local / "summary.json").read_text()) == summary
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (local / "adapter" / name).read_bytes() == (tracked_run / "adapter" / name).read_bytes()


def _wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB's log
    format (32 KiB blocks of chunks, each with a crc32, a length and a type: full, first, middle, last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_equals_metrics_jsonl(tracked_run: Path) -> None:
    # Prepare
    expected = _expected(tracked_run)
    summary = json.loads((tracked_run / "summary.json").read_text())
    (run_file,) = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")

    # Execute
    logged: dict[int, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            logged[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update if i.key != "_wandb"})

    # Assert
    assert logged == expected
    assert config == summary["config"]
