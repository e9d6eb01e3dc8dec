"""Shared fixtures: tiny causal LMs built from a config (no hub access), Flower task identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in parallel workers (pytest-xdist). torch's default of one thread
    # per core in every worker oversubscribes the cores, and its spinning OpenMP threads then slow
    # each worker down many times over (issue 15's measurement). One thread per worker, and for the
    # processes the tests start (fedtune's automatic choice is capped by OMP_NUM_THREADS).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from fedtune.data.loaders import DEMO_TEST
from fedtune.model.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]


def _gpus_missing(item: pytest.Item) -> bool:
    """A `gpu` test (``@pytest.mark.gpu(min_devices=N)``, default 1) with fewer CUDA GPUs here."""
    marks = list(item.iter_markers("gpu"))
    if not marks:
        return False
    needed = max(int(m.kwargs.get("min_devices", 1)) for m in marks)
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return have < needed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the `gpu` tests this machine lacks the GPUs for (reported as deselected, never skipped)."""
    missing = [item for item in items if _gpus_missing(item)]
    if missing:
        config.hook.pytest_deselected(items=missing)
        items[:] = [item for item in items if not _gpus_missing(item)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a BPE tokenizer and a chat template, saved to a temp dir."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base-model", seed=0)


@pytest.fixture(scope="session")
def tiny_model_no_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model, but its tokenizer has no chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-nt") / "base-model", seed=0, chat_template=False)


@pytest.fixture(scope="session")
def tiny_model_biases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Llama built with attention and MLP biases (what ``peft.method = bitfit`` trains)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bias") / "base-model", seed=0, biases=True)


@pytest.fixture
def task_identity() -> None:
    """Messages can be built outside a Flower runtime once a task identity is set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


# The settings of the tiny Ray runs that several modules check (outputs, output a person reads, same
# seed gives the same adapter): the tiny preset's 2 rounds and 3 sites, seed 3, and a held-out set
# whose answers span two lines (which only the printed sample reads; training does not use it).
TINY_RAY_RUN = ("--preset", "tiny", "--rounds", "2", "--clients", "3", "--seed", "3")


@dataclass(frozen=True)
class CliRun:
    """One finished `fedtune simulate`: its output dir, exit status, stdout and stderr."""

    out: Path
    returncode: int
    stdout: str
    stderr: str


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp dir that every xdist worker of this pytest run shares (each worker's basetemp is a
    subdir of it); this process's own basetemp without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_ray_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], CliRun]:
    """``tiny_ray_run(name)``: the tiny Ray run ``name`` (TINY_RAY_RUN, Flower's Ray engine, the CLI
    as a user runs it), made once per pytest run whichever worker asks first (a file lock: a module's
    tests may run on different xdist workers, and two modules may check the same run)."""
    root = _shared_root(tmp_path_factory) / "tiny-ray-runs"
    root.mkdir(exist_ok=True)

    def get(name: str) -> CliRun:
        here = root / name
        with FileLock(str(root / f"{name}.lock")):
            if not (here / "done.json").is_file():
                here.mkdir(exist_ok=True)
                eval_path = here / "eval.jsonl"
                rows = [json.loads(line) for line in DEMO_TEST.read_text().splitlines()]
                eval_path.write_text(
                    "".join(json.dumps({**r, "output": f"{r['output']}\nSo: done."}) + "\n" for r in rows)
                )
                env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
                cmd = [sys.executable, "-m", "fedtune.cli", "simulate", *TINY_RAY_RUN]
                cmd += ["--out", str(here / "run"), "--set", f"data.eval-path={eval_path}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
                (here / "stdout.txt").write_text(proc.stdout)
                (here / "stderr.txt").write_text(proc.stderr)
                (here / "done.json").write_text(json.dumps({"returncode": proc.returncode}))
        returncode = json.loads((here / "done.json").read_text())["returncode"]
        return CliRun(here / "run", returncode, (here / "stdout.txt").read_text(), (here / "stderr.txt").read_text())

    return get
