"""The two memory-bound kernels the server runs on every reply.

A 4.4M-parameter LoRA delta arrives as a few hundred arrays; per-array call overhead, not only
memory bandwidth, decides the cost here (benchmarks/aggregation.py).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.blas import saxpy, sdot


def _flat32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


def sum_of_squares(x: np.ndarray) -> float:
    """sum(x**2) in one pass; NaN if x holds NaN, inf if it holds inf (or overflows float32)."""
    flat = _flat32(x)
    return float(sdot(flat, flat)) if flat.size else 0.0


class Accumulator:
    """acc += alpha * x in place, summed in ``dtype``.

    float64 (the default) makes the sum independent of the order replies arrive in, so a resumed
    or re-run federation reproduces its adapter to 1e-6; with a float32 sum two same-seed runs
    differed by 1e-6 after two rounds, and a resumed fedadam run by 3e-6. float32 is one fused BLAS
    ``saxpy`` pass, about 1.2x a bare numpy sum against about 3.3x for float64
    (benchmarks/aggregation.py), for federations large enough that this matters more.
    """

    def __init__(self, dtype: str = "float64") -> None:
        self.dtype = np.dtype(dtype)
        self._scratch = np.empty(0, dtype=np.float32)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        """A new accumulator array."""
        return np.zeros(shape, dtype=self.dtype)

    def add(self, acc: np.ndarray, x: np.ndarray, alpha: float) -> None:
        """acc += alpha * x, in place (``acc`` from :meth:`zeros`)."""
        if self.dtype == np.float32:
            if acc.size:
                out = saxpy(_flat32(x), acc.reshape(-1), a=alpha)
                if not np.shares_memory(out, acc):  # BLAS wrote to a copy: keep the result anyway
                    acc.reshape(-1)[:] = out
            return
        flat = _flat32(x)
        if alpha == 1.0:
            np.add(acc.reshape(-1), flat, out=acc.reshape(-1))
            return
        if self._scratch.size < flat.size:
            self._scratch = np.empty(flat.size, dtype=np.float32)
        scaled = np.multiply(flat, np.float32(alpha), out=self._scratch[: flat.size])
        np.add(acc.reshape(-1), scaled, out=acc.reshape(-1))
