"""Fixed-point quantization of clipped float deltas onto Z_{2^b}, and back from a sum.

Secure aggregation adds integers modulo 2^b (Bonawitz et al. 2017, https://eprint.iacr.org/2017/281,
§3; Bell et al. 2020, https://eprint.iacr.org/2020/704). Each coordinate is clipped to [-clip, clip]
and mapped onto the grid 0..2^bits-1 with step ``2*clip/(2^bits-1)`` by unbiased stochastic rounding
(the dither is not key material, so it may come from a numpy generator). A sum of n such integers
stays below n*2^bits <= 2^(bits+ceil(log2 n)), so with that many modulus bits the sum taken modulo
2^b is the exact integer sum, and the server dequantizes it without wrap-around.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtune.wire.keys import MAX_MODULUS_BITS  # masked values on the wire


def modulus_bits(n_clients: int, bits: int) -> int:
    """Bits b of the modulus 2^b such that the sum of ``n_clients`` ``bits``-bit values never wraps.

    b = bits + ceil(log2 n). Raises ``ValueError`` when b would exceed 32, since values travel as uint32.
    """
    if n_clients < 1:
        raise ValueError(f"secure aggregation needs at least 1 client, got {n_clients}.")
    if bits < 1:
        raise ValueError(f"quantization bits must be >= 1, got {bits}.")
    b = bits + (n_clients - 1).bit_length()  # (n-1).bit_length() == ceil(log2 n) for n >= 1
    if b > MAX_MODULUS_BITS:
        most = MAX_MODULUS_BITS - (n_clients - 1).bit_length()
        raise ValueError(
            f"summing {n_clients} values of {bits} bits needs a modulus of 2^{b}, but masked values travel as "
            f"uint32 (at most 2^{MAX_MODULUS_BITS}); use at most {most} quantization bits for {n_clients} clients."
        )
    return b


def wire_dtype(modulus: int) -> np.dtype[np.unsignedinteger]:
    """The smallest unsigned dtype that holds a value modulo 2^``modulus`` (uint8, uint16 or uint32)."""
    if not 1 <= modulus <= MAX_MODULUS_BITS:
        raise ValueError(f"modulus bits must be in 1..{MAX_MODULUS_BITS}, got {modulus}.")
    for dtype in (np.uint8, np.uint16):
        if modulus <= np.iinfo(dtype).bits:
            return np.dtype(dtype)
    return np.dtype(np.uint32)


@dataclass(frozen=True, kw_only=True)
class Quantizer:
    """Stochastic fixed-point quantizer of values clipped to [-clip, clip] onto ``bits``-bit integers."""

    clip: float
    """Each coordinate is clipped to [-clip, clip] before quantization."""
    bits: int
    """Grid size 2^bits; the sum of n values needs ``modulus_bits(n, bits)`` bits."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"quantization clip must be a finite number > 0, got {self.clip}.")
        if not 1 <= self.bits <= MAX_MODULUS_BITS - 1:
            raise ValueError(f"quantization bits must be in 1..{MAX_MODULUS_BITS - 1}, got {self.bits}.")

    @property
    def step(self) -> float:
        """Grid step 2*clip/(2^bits-1): the distance between neighbouring representable values."""
        return 2.0 * self.clip / ((1 << self.bits) - 1)

    def quantize(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``values`` clipped and stochastically rounded to uint32 in 0..2^bits-1 (same shape).

        Rounding up happens with probability equal to the fractional part, so E[dequantized] equals
        the clipped value (unbiased). ``rng`` supplies only that dither.
        """
        if not np.all(np.isfinite(values)):
            raise ValueError("cannot quantize non-finite values (NaN or inf).")
        scaled = (np.clip(values.astype(np.float64), -self.clip, self.clip) + self.clip) / self.step
        rounded = np.floor(scaled + rng.random(scaled.shape))
        # scaled <= 2^bits-1 up to float error, and the dither is < 1, so only float error can overshoot.
        return np.clip(rounded, 0, (1 << self.bits) - 1).astype(np.uint32)

    def dequantize_sum(self, total: np.ndarray, n: int) -> np.ndarray:
        """The float64 sum of the ``n`` clipped vectors whose quantized values add up to ``total``.

        ``total`` is the exact integer sum (unmasked and below 2^b), so each term contributed q*step - clip.
        """
        return total.astype(np.float64) * self.step - n * self.clip

    def dequantize_mean(self, total: np.ndarray, n: int) -> np.ndarray:
        """The float64 mean of the ``n`` clipped vectors whose quantized values add up to ``total``."""
        if n < 1:
            raise ValueError(f"cannot take the mean of {n} vectors.")
        return self.dequantize_sum(total, n) / n

    def mean_error_bound(self) -> float:
        """Bound on |dequantized mean - mean of the clipped inputs|, per coordinate: one step.

        Each stochastic rounding moves a value by less than one step, so the sum of n moves is less
        than n steps and the mean's error less than one step (the expected error is 0 and its standard
        deviation at most step/(2 sqrt n)). Values beyond [-clip, clip] also lose their excess to clipping,
        which this bound does not cover.
        """
        return self.step
