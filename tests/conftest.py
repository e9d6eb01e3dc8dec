"""Shared fixtures: tiny causal LMs built from a config (no hub access), Flower task identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
