"""``report.to``: its parsing, the one line a missing tracker package gives before round 1, and the scalars a
``metrics.jsonl`` row hands the trackers; ``fedtune server`` refuses ``baselines``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.config.report import TRACKERS as NAMES
from fedtune.core.errors import ConfigError
from fedtune.server.app import run_server
from fedtune.server.tracking import TRACKERS, chosen, scalars


def test_every_tracker_name_is_registered_and_none_is_the_default() -> None:
    # Prepare / Execute
    cfg = RunConfig.from_flat({"report.to": " MLflow, tensorboard,mlflow "})

    # Assert
    assert TRACKERS.names() == sorted(NAMES)
    assert RunConfig().report.to == "none" and chosen(RunConfig()) == []
    assert cfg.report.names() == ["mlflow", "tensorboard"]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("bogus", r"^`report.to` has unknown tracker\(s\) 'bogus'; known: tensorboard, mlflow, wandb, all, none\.$"),
        ("none,wandb", r"^`report.to` takes `none` or `all` alone"),
    ],
)
def test_a_bad_report_to_is_one_line_naming_the_key(value: str, match: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat({"report.to": value})


def test_all_means_every_installed_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: wandb made unimportable (a None entry in sys.modules is what `import` treats as absent)
    monkeypatch.setitem(sys.modules, "wandb", None)

    # Execute
    names = chosen(RunConfig.from_flat({"report.to": "all"}))

    # Assert
    assert names == ["mlflow", "tensorboard"]


def test_a_missing_tracker_package_stops_the_server_before_round_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare
    monkeypatch.setitem(sys.modules, "mlflow", None)
    plan = Plan.from_flat({"report.to": "tensorboard,mlflow", "output.dir": str(tmp_path / "run")})

    # Execute / Assert: the server (simulation and deployment alike) stops before any model or round
    with pytest.raises(ConfigError) as caught:
        run_server(plan, grid=None)  # type: ignore[arg-type]  # never reached
    assert str(caught.value) == (
        "`report.to` = mlflow needs the `mlflow` package: pip install 'fedtune[tracking]' (or pip install mlflow)."
    )
    assert not (tmp_path / "run").exists()


def test_simulate_says_a_tracker_is_missing_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    argv = ["simulate", "--preset", "tiny", "--out", str(out), "--set", "report.to=wandb"]

    # Execute
    status = main([*argv, "--set", "simulation.backend=shared"])

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err == [
        "fedtune: error: `report.to` = wandb needs the `wandb` package: pip install 'fedtune[tracking]' "
        "(or pip install wandb)."
    ]
    assert not (out / "metrics.jsonl").exists()


def test_scalars_are_a_rows_finite_numbers_with_nested_ones_by_path() -> None:
    # Prepare
    row = {
        "round": 3,
        "sampled_nodes": [1, 2],
        "time": {"round_trip": 1.5, "eval": 2},
        "bytes_up": 10,
        "train_loss": None,
        "updated": True,
        "sites_eval": {"7": {"num_examples": 4, "eval_loss": 0.5}},
        "bytes_per_client": {"7": {"up": 10, "down": 0}},
        "eval_loss": 0.25,
        "epsilon": "inf",
        "clip_norm": math.nan,
    }

    # Execute
    values = scalars(row)

    # Assert
    assert values == {
        "time/round_trip": 1.5,
        "time/eval": 2.0,
        "bytes_up": 10.0,
        "sites_eval/7/num_examples": 4.0,
        "sites_eval/7/eval_loss": 0.5,
        "eval_loss": 0.25,
    }


def test_fedtune_server_refuses_baselines_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    argv = ["server", "--keys", str(tmp_path / "keys"), "--out", str(tmp_path / "run"), "--set", "baselines=local"]

    # Execute
    status = main(argv)

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1 and err[0].startswith("fedtune: error: `baselines` is for `fedtune simulate` only")
    assert not (tmp_path / "run").exists()
