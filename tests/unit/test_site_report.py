"""A site's start-up report (threads, data checks, sizes) is logged once per site, not once per process
that opens it (Ray workers, Flower's per-message ClientApp processes, a restarted site worker)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import RecordDict

from fedtune.client import site as site_module
from fedtune.client.site import open_site
from fedtune.config import RunConfig
from fedtune.config.presets import preset
from fedtune.wire import keys


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.kept: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.kept.append(record)

    logger, handler = logging.getLogger("fedtune"), Keep()
    logger.addHandler(handler)  # also when a CLI test in this process stopped propagation
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler.kept
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _open_twice(tiny_model: Path, state: RecordDict | None) -> None:
    cfg = RunConfig.from_flat({**preset("tiny"), "model.name": str(tiny_model)})
    for _ in range(2):
        site_module._SITES.clear()  # what a fresh process that opens the same site starts from
        open_site(cfg, {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}, state)


def _count(records: list[logging.LogRecord], needle: str) -> int:
    return sum(1 for r in records if r.getMessage().startswith("site 0: ") and needle in r.getMessage())


def test_the_report_is_logged_once_per_site(tiny_model: Path, records: list[logging.LogRecord]) -> None:
    # Execute: two processes open site 0 with the site's one context.state
    state = RecordDict()
    _open_twice(tiny_model, state)

    # Assert
    assert _count(records, "train /") == 1
    assert _count(records, "torch thread(s)") == 1
    assert site_module.ANNOUNCED in state


def test_without_a_context_each_process_reports(tiny_model: Path, records: list[logging.LogRecord]) -> None:
    _open_twice(tiny_model, None)
    assert _count(records, "train /") == 2
