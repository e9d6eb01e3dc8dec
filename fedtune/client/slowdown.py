"""``simulation.site-delays``: a site made slower on purpose, for tests and benchmarks of uneven federations."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from fedtune.config import RunConfig
from fedtune.wire import keys

log = logging.getLogger(__name__)


def site_delay(cfg: RunConfig, node_config: Mapping[str, Any], steps: int) -> float:
    """Extra seconds this site waits after ``steps`` local steps: its ``simulation.site-delays`` entry (cycled
    by partition id) per step; 0 without a partition id, or when the in-process grid holds the reply instead."""
    pid = node_config.get(keys.PARTITION_ID)
    if node_config.get(keys.GRID_DELAYS) or not isinstance(pid, int) or isinstance(pid, bool):
        return 0.0
    return cfg.simulation.delay(pid) * steps


def slow_down(cfg: RunConfig, node_config: Mapping[str, Any], steps: int) -> None:
    """Sleep :func:`site_delay` seconds (a slow machine), before the reply leaves the site."""
    seconds = site_delay(cfg, node_config, steps)
    if seconds > 0:
        log.info("partition %s: %.1f s of `simulation.site-delays`", node_config.get(keys.PARTITION_ID), seconds)
        time.sleep(seconds)
