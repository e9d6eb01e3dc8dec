"""User-level DP on deltas: clipping, Gaussian noise, DP-FedAvg's noised mean, adaptive clipping.

DP-FedAvg follows McMahan et al. 2018 (https://arxiv.org/abs/1710.06963): each client's delta is
clipped to L2 norm C, the server adds N(0, (z C)^2) to the sum and divides by a fixed denominator
(the expected number of clients), so one client changes the released sum by at most C. Adaptive
clipping follows Andrew et al. 2021 (https://arxiv.org/abs/1905.03871): C moves geometrically
towards a quantile of the update norms, estimated from a noised count of the clients whose update
fit under C. Each client's bit is centred to +-1/2 before the count is summed (as TF Privacy's
``QuantileEstimatorQuery`` does), so one client moves the released count by at most 1/2: that is
the sensitivity under which Andrew et al.'s noise split (``split_noise``) holds.

Everything here is a plain function of arrays; noise comes from the numpy generator passed in.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.strategies.kernels import Accumulator, sum_of_squares


def l2_norm(delta: Arrays) -> float:
    """L2 norm of all arrays together."""
    return math.sqrt(sum(sum_of_squares(v) for v in delta.values()))


CLIP_MARGIN = 2**-22
"""A clipped delta is scaled to a hair under C (relative 2.4e-7): rounding the float32 products then
cannot take its norm past C, so one client's contribution is at most C, not C plus rounding."""


def clip(delta: Arrays, clip_norm: float) -> tuple[Arrays, float]:
    """``delta`` scaled down to L2 norm at most ``clip_norm``, and its norm before clipping."""
    norm = l2_norm(delta)
    if norm <= clip_norm:
        return delta, norm
    scale = np.float32(clip_norm / norm * (1 - CLIP_MARGIN))
    return {k: (v * scale).astype(np.float32) for k, v in delta.items()}, norm


def gaussian(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """N(0, std^2) noise of ``shape`` in float64."""
    return rng.normal(0.0, std, size=shape) if std > 0 else np.zeros(shape)


def noise_rng() -> np.random.Generator:
    """A numpy generator seeded from the OS's entropy pool (never from the run's seed)."""
    return np.random.default_rng(secrets.randbits(128))


def privatize_locally(delta: Arrays, clip_norm: float, noise_multiplier: float, rng: np.random.Generator) -> Arrays:
    """Local DP: clip ``delta`` to C and add N(0, (z C)^2) to every entry, before it leaves the site."""
    clipped, _ = clip(delta, clip_norm)
    std = noise_multiplier * clip_norm
    return {k: (v + gaussian(v.shape, std, rng)).astype(np.float32) for k, v in clipped.items()}


def split_noise(noise_multiplier: float, count_stddev: float) -> float:
    """The delta's noise multiplier under adaptive clipping, so that the delta and the noised
    count together spend what one Gaussian release with ``noise_multiplier`` does
    (Andrew et al. 2021: z^-2 = z_delta^-2 + (2 sigma_b)^-2). The count's noise multiplier is
    sigma_b over its sensitivity 1/2, which holds because ``next_clip_norm`` centres each bit."""
    if count_stddev <= 0 or noise_multiplier <= 0:
        return noise_multiplier
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"`privacy.clip-count-stddev` ({count_stddev}) must exceed half the noise multiplier ({noise_multiplier})"
        )
    return float((noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5)


def next_clip_norm(
    clip_norm: float,
    unclipped: int,
    count: int,
    denominator: float,
    count_stddev: float,
    quantile: float,
    lr: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Andrew et al.'s geometric update: the noised share b of clients whose update fit under C,
    then C * exp(-lr (b - quantile)). Returns (next C, b).

    Of the ``count`` clients added, ``unclipped`` fit under C. The released statistic is the sum of
    their bits centred to +-1/2, unclipped - count / 2, plus N(0, ``count_stddev``^2): adding or
    removing one client moves it by exactly 1/2. Then b = released / denominator + 1/2.
    """
    released = unclipped - count / 2 + float(rng.normal(0.0, count_stddev))
    share = released / denominator + 0.5
    return clip_norm * math.exp(-lr * (share - quantile)), share


class NoisedSum:
    """DP-FedAvg's aggregate: (sum of clipped deltas + N(0, (z_delta C)^2)) / denominator.

    Deltas are clipped here (``clip_on_server``) or the client clipped them: then one whose norm is
    clearly over C (beyond float rounding, C (1 + 1e-5)) is a malformed reply and is rejected, and
    every other is clipped again here, so no reply moves the sum by more than C whatever its
    rounding. Every added client has weight 1: weighting by examples would let one client move the
    sum by more than C.
    """

    def __init__(
        self,
        clip_norm: float,
        delta_noise_multiplier: float,
        denominator: float,
        rng: np.random.Generator,
        *,
        clip_on_server: bool,
        sum_dtype: str = "float64",
    ) -> None:
        self.clip_norm = clip_norm
        self.std = delta_noise_multiplier * clip_norm
        self.denominator = denominator
        self.rng = rng
        self.clip_on_server = clip_on_server
        self._kernel = Accumulator(sum_dtype)
        self._sum: Arrays = {}
        self.count = 0
        self.unclipped = 0
        """Clients whose update fit under C before clipping (adaptive clipping's count)."""

    def add(self, delta: Arrays, norm: float, fits: bool | None = None) -> None:
        """Add one client's delta; ``norm`` is its L2 norm as received, ``fits`` the client's own
        report that its pre-clip norm was within C (client-side clipping)."""
        if self.clip_on_server:
            delta, norm = clip(delta, self.clip_norm)
            fits = norm <= self.clip_norm
        else:
            if norm > self.clip_norm * (1 + 1e-5):
                raise ValueError(f"update norm {norm:.6g} exceeds `privacy.clip-norm` = {self.clip_norm:.6g}")
            delta, _ = clip(delta, self.clip_norm)  # within rounding of C: the sensitivity stays C exactly
        if not self._sum:
            self._sum = {k: self._kernel.zeros(v.shape) for k, v in delta.items()}
        for k, v in delta.items():
            self._kernel.add(self._sum[k], v, 1.0)
        self.count += 1
        self.unclipped += int(bool(fits))

    def add_sum(self, total: Arrays, count: int) -> None:
        """Add the sum of ``count`` deltas that the clients clipped to C themselves (secure aggregation
        reveals only the sum, so its parts cannot be checked or counted under C here)."""
        if self.clip_on_server:
            raise ValueError("a sum of deltas cannot be clipped at the server; clip at the client")
        for k, v in total.items():
            self._sum[k] = self._sum[k] + v if k in self._sum else np.array(v, dtype=np.float64)
        self.count += count

    def result(self, reference: Arrays) -> Arrays:
        """The noised mean, shaped like ``reference`` (zeros plus noise if no client replied)."""
        out = {}
        for k, ref in reference.items():
            total = self._sum.get(k, np.zeros(ref.shape))
            out[k] = ((total + gaussian(ref.shape, self.std, self.rng)) / self.denominator).astype(np.float32)
        return out
