"""``simulation.site-delays``: a site made slower on purpose, for tests and benchmarks of uneven federations."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from fedtune.config import RunConfig
from fedtune.wire import keys

log = logging.getLogger(__name__)


SITE_DELAYS = "simulation.site-delays"


def site_delay(cfg: RunConfig, node_config: Mapping[str, Any], steps: int) -> float:
    """Extra seconds this site waits after ``steps`` local steps: its ``simulation.site-delays`` entry (cycled
    by partition id) per step; 0 when the in-process grid holds the reply instead.

    A deployed site may set the key for itself (``fedtune client --set simulation.site-delays=2``, its node
    config), which wins over the server's: a site without a partition id (its own ``--data``) then takes the
    first entry. Without either, a site is never slowed."""
    if node_config.get(keys.GRID_DELAYS):
        return 0.0
    pid = node_config.get(keys.PARTITION_ID)
    if not isinstance(pid, int) or isinstance(pid, bool):
        if SITE_DELAYS not in node_config:
            return 0.0
        pid = 0
    return cfg.simulation.delay(pid) * steps


def slow_down(cfg: RunConfig, node_config: Mapping[str, Any], steps: int) -> None:
    """Sleep :func:`site_delay` seconds (a slow machine), before the reply leaves the site."""
    seconds = site_delay(cfg, node_config, steps)
    if seconds > 0:
        log.info("this site sleeps %.1f s of `simulation.site-delays` (a test and benchmark knob)", seconds)
        time.sleep(seconds)
