"""Where fedtune keeps its caches; light enough for the processes that must not import torch."""

from __future__ import annotations

import os
from pathlib import Path


def fedtune_home() -> Path:
    """Where fedtune caches dequantized models (``$FEDTUNE_HOME``, default ``~/.cache/fedtune``)."""
    return Path(os.environ.get("FEDTUNE_HOME", "~/.cache/fedtune")).expanduser()


def tiny_model_dir() -> Path:
    """Where a site keeps the ``tiny`` preset's base model (built once)."""
    return fedtune_home() / "tiny" / "base-model"
