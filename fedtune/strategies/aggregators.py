"""Aggregators: weighted mean (streamed), and robust rules that need every update.

Robust rules follow Yin et al. 2018 (coordinate-wise median and trimmed mean,
https://arxiv.org/abs/1803.01498) and Blanchard et al. 2017 (Krum / Multi-Krum,
https://arxiv.org/abs/1703.02757).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedtune.config import StrategyConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import FedtuneError, UpdateRejected
from fedtune.model.lora import rank_masks, rank_of
from fedtune.strategies.kernels import Accumulator


class WeightedMean:
    """Running weighted mean: memory is one accumulator (``strategy.sum-dtype``), not one copy per
    client.

    Rank-aware: an update from a lower-rank site (zero-padded to the global rank) counts only in the
    entries its rank covers, so each entry is averaged over the sites that trained it (HetLoRA-style
    weighting, Cho et al. 2024, https://arxiv.org/abs/2401.06432). The same rule divides a SecAgg+ sum
    (:meth:`add_sum`), whose parts are known only by (weight, rank).
    """

    def __init__(self, cfg: StrategyConfig | None = None, global_arrays: Arrays | None = None) -> None:
        self._kernel = Accumulator(cfg.sum_dtype if cfg is not None else "float64")
        self._full = (rank_of(global_arrays) or 0) if global_arrays is not None else None
        self._sum: Arrays = {}
        self._weight = 0.0
        self._masked: Arrays = {}  # per-entry weight sums, only once a lower-rank update arrived
        self._masks: dict[int, Arrays] = {}  # the entries each lower rank covers

    def add(self, delta: Arrays, weight: float, *, rank: int | None = None, under_clip: bool = False) -> None:
        _check_weight(weight)
        self._accumulate(delta, weight)
        self._cover(weight, rank, delta)

    def add_sum(self, total: Arrays, parts: Sequence[tuple[float, int]]) -> None:
        """Add sum_i w_i x_i of the ``parts`` (w_i, rank_i): kept in float64, as the sum was formed."""
        by_rank: dict[int, float] = {}
        for weight, rank in parts:
            _check_weight(weight)
            by_rank[rank] = by_rank.get(rank, 0.0) + weight
        for k, v in total.items():
            self._sum[k] = self._sum[k] + v if k in self._sum else np.array(v, dtype=np.float64)
        for rank, weight in by_rank.items():
            self._cover(weight, rank, total)

    def _cover(self, weight: float, rank: int | None, like: Arrays) -> None:
        """Count ``weight`` in the entries a rank-``rank`` update covers (all of them at the global rank)."""
        if rank is None or rank == self._full:
            self._weight += weight
            for k in self._masked:
                self._masked[k] += weight
            return
        if rank not in self._masks:
            self._masks[rank] = rank_masks(rank, like)
        masks = self._masks[rank]
        for k in like:
            if k not in self._masked:
                self._masked[k] = np.full(like[k].shape, self._weight, dtype=np.float64)
            self._masked[k] += weight * masks[k]
        self._weight += weight

    def _accumulate(self, delta: Arrays, weight: float) -> None:
        if not self._sum:
            self._sum = {k: self._kernel.zeros(v.shape) for k, v in delta.items()}
        for k, v in delta.items():
            self._kernel.add(self._sum[k], v, weight)

    def result(self) -> Arrays:
        """sum_i w_i x_i / sum_i w_i per entry, as float32 (entries nobody trained stay 0)."""
        if self._weight <= 0:
            raise ValueError("no weight was added")
        out = {}
        for k, v in self._sum.items():
            if k in self._masked:
                w = self._masked[k]
                out[k] = np.divide(v, w, out=np.zeros(v.shape, np.float64), where=w > 0).astype(np.float32)
            else:
                out[k] = (v / self._weight).astype(np.float32)
        return out

    def metrics(self) -> dict[str, float]:
        return {}


def _check_weight(weight: float) -> None:
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")


class _Collect:
    """Holds every update of the round (robust rules need them all)."""

    def __init__(self, cfg: StrategyConfig, global_arrays: Arrays) -> None:
        self.cfg = cfg
        self.full_rank = rank_of(global_arrays) or 0
        self.updates: list[Arrays] = []
        self.weights: list[float] = []

    def add(self, delta: Arrays, weight: float, *, rank: int | None = None, under_clip: bool = False) -> None:
        if rank is not None and rank != self.full_rank:
            raise UpdateRejected(f"`strategy.name` = {self.cfg.name} has no rule for rank {rank}")
        _check_weight(weight)
        self.updates.append(delta)
        self.weights.append(weight)

    def add_sum(self, total: Arrays, parts: Sequence[tuple[float, int]]) -> None:
        raise FedtuneError(
            f"`strategy.name` = {self.cfg.name} needs every update, and secure aggregation reveals only their sum"
        )

    def stacked(self, key: str) -> np.ndarray:
        return np.stack([u[key] for u in self.updates]).astype(np.float64)  # (N, *shape)

    def metrics(self) -> dict[str, float]:
        return {}


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-coordinate lower weighted median of ``values`` (N, ...) with weights (N,)."""
    order = np.argsort(values, axis=0, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=0)
    cum = np.cumsum(weights[order], axis=0)  # (N, ...)
    index = np.argmax(cum >= cum[-1] / 2, axis=0)[None]
    return np.asarray(np.take_along_axis(sorted_values, index, axis=0)[0])


class Median(_Collect):
    """Coordinate-wise median (``np.median`` when uniform, weighted median otherwise)."""

    def result(self) -> Arrays:
        w = np.asarray(self.weights)
        uniform = np.allclose(w, w[0])
        out = {}
        for key in self.updates[0]:
            x = self.stacked(key)
            out[key] = (np.median(x, axis=0) if uniform else weighted_median(x, w)).astype(np.float32)
        return out


class TrimmedMean(_Collect):
    """Per coordinate, drop the floor(trim-fraction * n) largest and smallest values, then average."""

    def result(self) -> Arrays:
        n = len(self.updates)
        k = math.floor(self.cfg.trim_fraction * n)
        w = np.asarray(self.weights)
        out = {}
        for key in self.updates[0]:
            x = self.stacked(key)
            order = np.argsort(x, axis=0, kind="stable")[k : n - k]
            kept, kept_w = np.take_along_axis(x, order, axis=0), w[order]
            out[key] = ((kept * kept_w).sum(axis=0) / kept_w.sum(axis=0)).astype(np.float32)
        return out


class Krum(_Collect):
    """Krum (``select`` = 1) or Multi-Krum: average the updates closest to their n - f - 2 neighbours."""

    def __init__(self, cfg: StrategyConfig, global_arrays: Arrays, multi: bool = False) -> None:
        super().__init__(cfg, global_arrays)
        self.multi = multi
        self.selected: list[int] = []

    def result(self) -> Arrays:
        n, f = len(self.updates), self.cfg.krum_byzantine
        neighbours = n - f - 2
        if neighbours < 1:
            raise FedtuneError(f"krum needs n > f + 2 replies; got n = {n}, `strategy.krum-byzantine` = {f}")
        flat = np.concatenate([self.stacked(k).reshape(n, -1) for k in self.updates[0]], axis=1)  # (N, P)
        sq = (flat * flat).sum(axis=1)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0.0)  # (N, N) squared
        np.fill_diagonal(dist, np.inf)
        scores = np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)
        m = (self.cfg.multi_krum_select or n - f) if self.multi else 1
        self.selected = sorted(np.argsort(scores, kind="stable")[: min(m, n)].tolist())
        mean = WeightedMean()
        for i in self.selected:
            mean.add(self.updates[i], self.weights[i])
        return mean.result()

    def metrics(self) -> dict[str, float]:
        return {"krum_selected": float(len(self.selected))}


class MultiKrum(Krum):
    """Multi-Krum: averages the ``strategy.multi-krum-select`` best-scored updates (0 = n - f)."""

    def __init__(self, cfg: StrategyConfig, global_arrays: Arrays) -> None:
        super().__init__(cfg, global_arrays, multi=True)
