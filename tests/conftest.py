"""Shared fixtures: tiny causal LMs built from a config (no hub access), Flower task identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from fedtune.simulations.presets import build_tiny_model

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the `gpu` tests when no CUDA GPU is present (reported as deselected, never skipped)."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a BPE tokenizer and a chat template, saved to a temp dir."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base-model", seed=0)


@pytest.fixture(scope="session")
def tiny_model_no_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model, but its tokenizer has no chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-nt") / "base-model", seed=0, chat_template=False)


@pytest.fixture
def task_identity() -> None:
    """Messages can be built outside a Flower runtime once a task identity is set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
