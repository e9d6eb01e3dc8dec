"""Data checks a site runs on its raw records before training: what is wrong, and where.

Four kinds of problem are counted; the report names files and line numbers, never the content:

- **malformed**: a line that does not parse (JSON, or a CSV row with the wrong number of fields),
  a JSON line that is not an object, a record without the instruction or output field, or a field
  that is a list or an object instead of text;
- **empty**: the instruction or the output is null or blank;
- **duplicates**: records whose instruction, input and output repeat an earlier record's (each
  extra copy counts once); kept, and reported;
- **too long**: records whose prompt and response exceed ``data.max-seq-len`` tokens; cut as
  ``data.truncation`` says (``fedtune.data.truncation``), and reported: how many prompts were cut,
  and how many responses alone exceed the limit (under ``prompt`` only those are dropped).

Malformed and empty records are *bad records*: ``data.on-bad-record = skip`` drops them and says
how many, ``fail`` refuses the data with the first problem's file, line and kind.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import DataConfig
from fedtune.core.errors import DataError

SHOWN = 20  # problems listed one per line in a log; the rest are counted


@dataclass(frozen=True)
class Problem:
    """One bad record: where it is (line in the file, or row), and what is wrong with it."""

    line: int
    kind: str
    empty: bool = False
    """True for an empty record, False for a malformed one."""


@dataclass
class CheckReport:
    """What the checks found in one source; the counts are what a site may report."""

    source: str
    unit: str = "line"
    """``line`` (JSONL/CSV: the file's line numbers) or ``row`` (1-based record index)."""
    records: int = 0
    """Records read, bad ones included (blank lines are not records)."""
    problems: list[Problem] = field(default_factory=list)
    duplicates: int = 0
    too_long: int = 0
    prompts_cut: int = 0
    """Of the too-long records, those kept whole by cutting the prompt from the left."""
    responses_too_long: int = 0
    """Records whose response alone exceeds the limit: dropped under ``data.truncation = prompt``."""
    columns: dict[str, None] = field(default_factory=dict)
    """Every field name any record had, in first-seen order."""

    @property
    def malformed(self) -> int:
        return sum(not p.empty for p in self.problems)

    @property
    def empty(self) -> int:
        return sum(p.empty for p in self.problems)

    def counts(self) -> dict[str, int]:
        """The counts (never any content)."""
        return {
            "malformed": self.malformed,
            "empty": self.empty,
            "duplicates": self.duplicates,
            "too_long": self.too_long,
            "prompts_cut": self.prompts_cut,
            "responses_too_long": self.responses_too_long,
        }

    def lines(self, max_seq_len: int, truncation: str = "prompt") -> list[str]:
        """The report as log lines: one summary, then the first bad records by line number."""
        dropped = f"{len(self.problems)} dropped" if self.problems else "none dropped"
        head = (
            f"data checks on {self.source}: {self.records} records; {self.malformed} malformed, {self.empty} empty "
            f"({dropped}), {self.duplicates} duplicates (kept), {self.too_long} longer than `data.max-seq-len` = "
            f"{max_seq_len} tokens ({cut_phrase(self.prompts_cut, self.responses_too_long, truncation)})"
        )
        shown = [f"  {self.unit} {p.line}: {p.kind}" for p in self.problems[:SHOWN]]
        if len(self.problems) > SHOWN:
            shown.append(f"  ... and {len(self.problems) - SHOWN} more bad records")
        return [head, *shown]


def cut_phrase(prompts_cut: int, responses_too_long: int, truncation: str) -> str:
    """What ``data.truncation`` did to the too-long records, in words."""
    if truncation == "prompt":
        return (
            f"`data.truncation` = prompt: {prompts_cut} prompts cut from the left, {responses_too_long} "
            "responses alone longer than the limit dropped"
        )
    return (
        f"`data.truncation` = right: cut from the right; {responses_too_long} responses alone longer than "
        "the limit lose their end"
    )


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    """(line number, record or Problem) for each non-blank line of a JSONL file."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, Problem(number, "not UTF-8 text")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                yield number, Problem(number, "not valid JSON")
                continue
            yield number, value if isinstance(value, dict) else Problem(number, "not a JSON object")


def read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    """(first line number, record or Problem) for each non-blank row of a CSV file with a header."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text.") from None
    reader = csv.reader(text.splitlines(keepends=True))
    header: list[str] | None = None
    done = 0  # physical lines consumed so far
    while True:
        start = done + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            if reader.line_num == done:  # the reader cannot move on
                return
            done = reader.line_num
            yield start, Problem(start, "not valid CSV")
            continue
        done = reader.line_num
        if not row:
            continue
        if header is None:
            header = row
        elif len(row) != len(header):
            yield start, Problem(start, f"{len(row)} fields where the header has {len(header)}")
        else:
            yield start, dict(zip(header, row, strict=True))


def check_record(record: Mapping[str, Any], line: int, cfg: DataConfig) -> Problem | None:
    """The record's problem, or None when it can be trained on."""
    for name in (cfg.instruction_field, cfg.output_field):
        if name not in record:
            return Problem(line, f"no field {name!r}")
    for name in (cfg.instruction_field, cfg.input_field, cfg.output_field, cfg.label_field):
        if name and isinstance(record.get(name), list | dict):
            return Problem(line, f"field {name!r} is a {type(record[name]).__name__}, not text")
    for name in (cfg.instruction_field, cfg.output_field):
        if record[name] is None or not str(record[name]).strip():
            return Problem(line, f"empty {name!r}", empty=True)
    return None


def screen(
    numbered: Iterable[tuple[int, Mapping[str, Any] | Problem]], cfg: DataConfig, source: str, unit: str
) -> tuple[list[dict[str, Any]], CheckReport]:
    """The good records, and a report of the bad ones (malformed and empty)."""
    report = CheckReport(source=source, unit=unit)
    good: list[dict[str, Any]] = []
    for line, item in numbered:
        report.records += 1
        if not isinstance(item, Problem):
            report.columns.update(dict.fromkeys(item))
        problem = item if isinstance(item, Problem) else check_record(item, line, cfg)
        if problem is not None:
            report.problems.append(problem)
        else:
            good.append(dict(item))  # type: ignore[arg-type]  # not a Problem here
    return good, report


def enforce(report: CheckReport, cfg: DataConfig, key: str) -> None:
    """Under ``data.on-bad-record = fail``, refuse data that holds any bad record."""
    if cfg.on_bad_record != "fail" or not report.problems:
        return
    first = report.problems[0]
    more = f" (and {len(report.problems) - 1} more bad records)" if len(report.problems) > 1 else ""
    raise DataError(
        f"`{key}`: {report.source} {report.unit} {first.line}: {first.kind}{more}; "
        "`data.on-bad-record` = fail (set it to skip to drop bad records)."
    )


def count_duplicates(records: Iterable[Mapping[str, Any]], cfg: DataConfig) -> int:
    """Records whose instruction, input and output repeat an earlier record's (extra copies)."""
    seen: set[tuple[str, str, str]] = set()
    extra = 0
    for r in records:
        fields = (cfg.instruction_field, cfg.input_field, cfg.output_field)
        sig = (str(r.get(fields[0]) or ""), str(r.get(fields[1]) or ""), str(r.get(fields[2]) or ""))
        if sig in seen:
            extra += 1
        seen.add(sig)
    return extra
