"""Load instruction records from JSONL/CSV/Parquet files or a Hugging Face dataset name."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from fedtune.config import DataConfig
from fedtune.core.errors import DataError
from fedtune.data import checks
from fedtune.data.checks import CheckReport, Problem

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_TRAIN = DEMO_DIR / "train.jsonl"
DEMO_TEST = DEMO_DIR / "test.jsonl"

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_LINE_READERS: dict[str, Callable[[Path], Iterator[tuple[int, dict[str, Any] | Problem]]]] = {
    ".jsonl": checks.read_jsonl,
    ".csv": checks.read_csv,
}


def train_source(cfg: DataConfig) -> str:
    """The training data ``data.path`` points at (the built-in demo set when empty)."""
    return cfg.path or str(DEMO_TRAIN)


def eval_source(cfg: DataConfig) -> str | None:
    """The server's held-out set, or None when there is none (centralized eval then skipped)."""
    if cfg.eval_path:
        return cfg.eval_path
    return str(DEMO_TEST) if not cfg.path else None


def load_eval_records(cfg: DataConfig) -> Dataset | None:
    """The server's held-out set after the data checks, or None when there is none; a problem is
    reported under the key that named the file (``data.eval-path``, else ``data.path``)."""
    source = eval_source(cfg)
    if source is None:
        return None
    return load_records(source, cfg, key="data.eval-path" if cfg.eval_path else "data.path")


def load_records(source: str, cfg: DataConfig, key: str = "data.path") -> Dataset:
    """Load ``source`` after the data checks (see :func:`load_checked`); log what they found."""
    ds, report = load_checked(source, cfg, key)
    if report.problems:
        log.warning("%s", "\n".join(report.lines(cfg.max_seq_len, cfg.truncation)))
    return ds


def load_checked(source: str, cfg: DataConfig, key: str = "data.path") -> tuple[Dataset, CheckReport]:
    """Load ``source``, run the record checks (``fedtune.data.checks``) and apply
    ``data.on-bad-record``; return the records kept and the report.

    ``source`` is a local file (by suffix) or, when no such file exists and it does not look like a
    path, a Hugging Face dataset name loaded with its ``train`` split. JSONL and CSV files are read
    line by line, so a bad line is counted with its line number instead of failing the whole file.
    """
    path = Path(source).expanduser()
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is not None or path.exists() or source.startswith(("/", ".", "~")):
        if not path.is_file():
            raise DataError(f"`{key}`: no such data file: {source}")
        if builder is None:
            raise DataError(f"`{key}`: {source} must end in .jsonl, .json, .csv or .parquet.")
        if path.suffix.lower() in _LINE_READERS:
            good, report = checks.screen(_LINE_READERS[path.suffix.lower()](path), cfg, source, "line")
            if report.columns:  # else no line parsed: "no usable records" below says so
                _check_columns(list(report.columns), source, cfg, key)
            checks.enforce(report, cfg, key)
            return _to_dataset(good, source, cfg, report, key), report
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            raise DataError(f"`{key}`: cannot read {source}: {_short(exc)}") from None
    else:
        try:
            ds = datasets.load_dataset(source, split="train")
        except Exception as exc:
            raise DataError(f"`{key}`: cannot load dataset {source!r}: {_short(exc)}") from None
    _check_columns(ds.column_names, source, cfg, key)
    _, report = checks.screen(((i + 1, row) for i, row in enumerate(ds)), cfg, source, "row")
    checks.enforce(report, cfg, key)
    if report.problems:
        bad = {p.line - 1 for p in report.problems}
        ds = ds.select([i for i in range(len(ds)) if i not in bad])
    if len(ds) == 0:
        raise DataError(f"`{key}`: {source} holds no usable records{_dropped(report)}.")
    return ds, report


def _to_dataset(rows: list[dict[str, Any]], source: str, cfg: DataConfig, report: CheckReport, key: str) -> Dataset:
    """The good records of a JSONL/CSV file as a Dataset; text fields as strings."""
    if not rows:
        raise DataError(f"`{key}`: {source} holds no usable records{_dropped(report)}.")
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    text = {cfg.instruction_field, cfg.input_field, cfg.output_field, cfg.label_field} - {""}
    columns = {
        name: [None if r.get(name) is None else str(r[name]) for r in rows]
        if name in text
        else [r.get(name) for r in rows]
        for name in names
    }
    try:
        ds = Dataset.from_dict(columns)
    except Exception as exc:  # pyarrow: a column mixing types it cannot unify
        raise DataError(f"`{key}`: cannot read {source}: {_short(exc)}") from None
    return ds


def _check_columns(columns: list[str], source: str, cfg: DataConfig, key: str) -> None:
    for column in (cfg.instruction_field, cfg.output_field):
        if column not in columns:
            field = "instruction-field" if column == cfg.instruction_field else "output-field"
            raise DataError(
                f"`{key}`: {source} has no column {column!r} (set `data.{field}`); columns: {', '.join(columns)}"
            )


def _dropped(report: CheckReport) -> str:
    if not report.problems:
        return ""
    return f" ({report.malformed} malformed and {report.empty} empty records dropped, `data.on-bad-record` = skip)"


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
