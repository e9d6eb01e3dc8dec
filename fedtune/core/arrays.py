"""The one array-dict type every layer passes around: adapter weights or deltas by state-dict key."""

from __future__ import annotations

import numpy as np

Arrays = dict[str, np.ndarray]
"""Arrays by PEFT state-dict key (or model key for bitfit / full)."""
