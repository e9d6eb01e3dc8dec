"""Checks every client reply before it can touch the global adapter."""

from __future__ import annotations

import math

import numpy as np

from fedtune.errors import UpdateRejected

Arrays = dict[str, np.ndarray]


def validate_delta(delta: Arrays, reference: Arrays, max_norm: float) -> Arrays:
    """Return ``delta`` if it matches ``reference``'s keys, shapes and dtypes, is finite, and its
    L2 norm is at most ``max_norm`` (0 = no bound); raise UpdateRejected with the reason otherwise.
    """
    missing = sorted(set(reference) - set(delta))
    extra = sorted(set(delta) - set(reference))
    if missing:
        raise UpdateRejected(f"missing {len(missing)} adapter key(s), e.g. {missing[0]!r}")
    if extra:
        raise UpdateRejected(f"{len(extra)} unexpected key(s), e.g. {extra[0]!r}")
    squares = 0.0
    for key, ref in reference.items():
        value = delta[key]
        if value.shape != ref.shape:
            raise UpdateRejected(f"{key!r} has shape {value.shape}, expected {ref.shape}")
        if value.dtype != ref.dtype:
            raise UpdateRejected(f"{key!r} has dtype {value.dtype}, expected {ref.dtype}")
        if not np.isfinite(value).all():
            raise UpdateRejected(f"{key!r} holds NaN or Inf")
        squares += float(np.square(value, dtype=np.float64).sum())
    norm = math.sqrt(squares)
    if max_norm > 0 and norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.4g} exceeds server.max-update-norm {max_norm:.4g}")
    return delta
