"""Load instruction records from JSONL/CSV/Parquet files or a Hugging Face dataset name."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
from datasets import Dataset

from fedtune.config import DataConfig
from fedtune.errors import DataError

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_TRAIN = DEMO_DIR / "train.jsonl"
DEMO_TEST = DEMO_DIR / "test.jsonl"

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def train_source(cfg: DataConfig) -> str:
    """The training data ``data.path`` points at (the built-in demo set when empty)."""
    return cfg.path or str(DEMO_TRAIN)


def eval_source(cfg: DataConfig) -> str | None:
    """The server's held-out set, or None when there is none (centralized eval then skipped)."""
    if cfg.eval_path:
        return cfg.eval_path
    return str(DEMO_TEST) if not cfg.path else None


def load_records(source: str, cfg: DataConfig, key: str = "data.path") -> Dataset:
    """Load ``source`` and check it has the instruction and output columns.

    ``source`` is a local file (by suffix) or, when no such file exists and it does not look like a
    path, a Hugging Face dataset name loaded with its ``train`` split.
    """
    path = Path(source).expanduser()
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is not None or path.exists() or source.startswith(("/", ".", "~")):
        if not path.is_file():
            raise DataError(f"`{key}`: no such data file: {source}")
        if builder is None:
            raise DataError(f"`{key}`: {source} must end in .jsonl, .json, .csv or .parquet.")
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            raise DataError(f"`{key}`: cannot read {source}: {_short(exc)}") from None
    else:
        try:
            ds = datasets.load_dataset(source, split="train")
        except Exception as exc:
            raise DataError(f"`{key}`: cannot load dataset {source!r}: {_short(exc)}") from None
    for column in (cfg.instruction_field, cfg.output_field):
        if column not in ds.column_names:
            field = "instruction-field" if column == cfg.instruction_field else "output-field"
            raise DataError(
                f"`{key}`: {source} has no column {column!r} (set `data.{field}`); "
                f"columns: {', '.join(ds.column_names)}"
            )
    if len(ds) == 0:
        raise DataError(f"`{key}`: {source} holds no records.")
    return ds


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
