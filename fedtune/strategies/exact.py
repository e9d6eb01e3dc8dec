"""Exact LoRA aggregation: average the products B_i A_i, then re-factorize to rank r by SVD.

Averaging A and B separately gives mean(B) mean(A), which is not mean(B A): the "exact" rule
averages the low-rank updates themselves and projects the mean back to rank r with a truncated
SVD (Eckart-Young: the best rank-r approximation in Frobenius norm). What that projection loses is
reported each round as ``exact_reconstruction_error`` = ||M - B'A'||_F / ||M||_F.
"""

from __future__ import annotations

import numpy as np

from fedtune.config import StrategyConfig
from fedtune.core.arrays import Arrays
from fedtune.model.lora import LORA_A, LORA_B
from fedtune.strategies.aggregators import WeightedMean, _Collect


def lora_pairs(keys: list[str]) -> list[tuple[str, str]]:
    """(A key, B key) for every LoRA module in a PEFT state dict."""
    return [(k, k.replace(LORA_A, LORA_B)) for k in keys if LORA_A in k and k.replace(LORA_A, LORA_B) in keys]


def refactorize(product: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-``rank`` factors (B (out, r), A (r, in)) of ``product`` and the relative error."""
    u, s, vt = np.linalg.svd(product, full_matrices=False)
    root = np.sqrt(s[:rank])
    b = u[:, :rank] * root[None, :]  # (out, r)
    a = root[:, None] * vt[:rank]  # (r, in)
    norm = float(np.linalg.norm(product))
    error = float(np.linalg.norm(product - b @ a)) / norm if norm > 0 else 0.0
    return b, a, error


class ExactLoRA(_Collect):
    """Mean of B_i A_i over clients, re-factorized; the result is expressed as a delta."""

    def __init__(self, cfg: StrategyConfig, global_arrays: Arrays) -> None:
        super().__init__(cfg, global_arrays)
        self.global_arrays = global_arrays
        self.errors: list[float] = []

    def result(self) -> Arrays:
        keys = list(self.global_arrays)
        pairs = lora_pairs(keys)
        total = float(sum(self.weights))
        paired = {k for pair in pairs for k in pair}
        rest = WeightedMean()  # any non-LoRA trainable tensors: plain weighted mean
        for update, w in zip(self.updates, self.weights, strict=True):
            rest.add({k: v for k, v in update.items() if k not in paired}, w)
        out = rest.result() if len(paired) < len(keys) else {}
        self.errors = []
        for ka, kb in pairs:
            ga, gb = self.global_arrays[ka].astype(np.float64), self.global_arrays[kb].astype(np.float64)
            product = np.zeros((gb.shape[0], ga.shape[1]))  # (out, in)
            for update, w in zip(self.updates, self.weights, strict=True):
                product += (w / total) * ((gb + update[kb]) @ (ga + update[ka]))
            b, a, error = refactorize(product, rank=ga.shape[0])
            self.errors.append(error)
            out[ka] = (a - ga).astype(np.float32)
            out[kb] = (b - gb).astype(np.float32)
        return out

    def metrics(self) -> dict[str, float]:
        return {"exact_reconstruction_error": max(self.errors, default=0.0)}
