"""The run's console view: the config tree and the per-round table (log lines and ``rounds.md``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from rich.console import Console
from rich.tree import Tree

from fedtune.config import RunConfig
from fedtune.model.task_metrics import GENERATED, LOSS, column
from fedtune.server.record import RoundRecord


@dataclass(frozen=True)
class Column:
    """One column of the round table: its header, how a record gives its value, width and format."""

    header: str
    value: Callable[[RoundRecord], Any]
    width: int
    fmt: str


def _score(name: str) -> Callable[[RoundRecord], float | None]:
    return lambda record: record.score(name)


COLUMNS: list[Column] = [
    Column("round", attrgetter("round"), 5, "d"),
    Column("sampled", attrgetter("sampled"), 7, "d"),
    Column("replied", attrgetter("replied"), 7, "d"),
    Column("failed", attrgetter("failed"), 6, "d"),
    Column("train_loss", attrgetter("train_loss"), 10, ".4f"),
    Column("eval_loss", _score(LOSS), 9, ".4f"),
    Column("epsilon", attrgetter("epsilon"), 7, ".3f"),
    Column("up", attrgetter("bytes_up"), 9, "bytes"),
    Column("down", attrgetter("bytes_down"), 9, "bytes"),
    Column("seconds", attrgetter("seconds"), 7, ".1f"),
]


def _contributors(record: RoundRecord) -> str | None:
    """``node@staleness`` of each reply aggregated into an async version (``1@0 2@1``)."""
    if record.contributors is None:
        return None
    return " ".join(f"{c.node}@{c.staleness}" for c in record.contributors)


def _idle(record: RoundRecord) -> float | None:
    """The sites' idle seconds in the round or version, summed (site-seconds; per site in ``metrics.jsonl``)."""
    return sum(record.idle_seconds.values()) if record.idle_seconds is not None else None


ASYNC_COLUMNS: list[Column] = [
    Column("version", attrgetter("version"), 7, "d"),
    Column("contributors", _contributors, 12, "s"),
    Column("idle", _idle, 6, ".1f"),
]
"""What ``server.mode = async`` adds after ``round``: the version, who contributed at which staleness, and
the sites' idle seconds."""


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    if fmt == "bytes":
        return human_bytes(float(value))
    return format(value, fmt)


def columns(metrics: Sequence[str] = (), *, asynchronous: bool = False) -> list[Column]:
    """The table's columns: :data:`COLUMNS`, with one column per task metric after ``eval_loss``, and
    :data:`ASYNC_COLUMNS` after ``round`` when ``asynchronous``."""
    extra = [Column(column(m), _score(m), max(len(column(m)), 6), ".3f") for m in metrics if m in GENERATED]
    at = [c.header for c in COLUMNS].index("eval_loss") + 1
    cols = COLUMNS[:at] + extra + COLUMNS[at:]
    return cols[:1] + ASYNC_COLUMNS + cols[1:] if asynchronous else cols


def table_header(cols: Sequence[Column] = COLUMNS) -> str:
    """The per-round table's header line."""
    return " | ".join(c.header.rjust(c.width) for c in cols)


def table_row(record: RoundRecord, cols: Sequence[Column] = COLUMNS) -> str:
    """One round as a table line."""
    return " | ".join(_cell(c.value(record), c.fmt).rjust(c.width) for c in cols)


def markdown(history: Sequence[RoundRecord], cols: Sequence[Column] = COLUMNS) -> str:
    """The round table as markdown (``rounds.md``)."""
    lines = ["| " + " | ".join(c.header for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(c.value(r), c.fmt) for c in cols) + " |" for r in history]
    return "\n".join(lines) + "\n"


def config_tree(cfg: RunConfig) -> str:
    """The effective config as a tree, one branch per section."""
    tree = Tree("[bold]fedtune run config[/bold]")
    sections: dict[str, Tree] = {}
    for key, value in cfg.to_flat().items():
        section, _, name = key.rpartition(".")
        if section and section not in sections:
            sections[section] = tree.add(f"[bold]{section}[/bold]")
        (sections[section] if section else tree).add(f"{name} = {value!r}")
    console = Console(width=100, record=True, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(tree)
    return cap.get().rstrip()
