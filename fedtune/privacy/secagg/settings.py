"""A round's SecAgg+ parameters from its config and the number of sampled clients: degree, threshold, bits, clip.

``secagg.degree`` and ``secagg.threshold`` default to 0 (auto), resolved here for the N actually
sampled, so the defaults are valid for every N >= 2; ``check_params`` then checks the result. The plan
checker calls :func:`problems` with the smallest N a round can sample, the server :func:`resolve` with
the real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.config import RunConfig
from fedtune.privacy.secagg.errors import SecAggError
from fedtune.privacy.secagg.graph import check_params, default_threshold, effective_degree
from fedtune.privacy.secagg.graph import problems as graph_problems
from fedtune.privacy.secagg.quantize import Quantizer

#: Kingma & Ba 2015 (https://arxiv.org/abs/1412.6980, §2.1): an Adam(W) step moves a coordinate by at most
#: lr * (1 - beta1) / sqrt(1 - beta2) when 1 - beta1 > sqrt(1 - beta2); torch's defaults (0.9, 0.999) give 3.162.
ADAM_STEP_BOUND = (1 - 0.9) / math.sqrt(1 - 0.999)
#: Complete graph up to this many clients (each client masks with every other one).
COMPLETE_UP_TO = 16
#: Under ``local`` DP the clip covers this many noise standard deviations (all but about 6e-5 of entries).
NOISE_SIGMAS = 4.0


def auto_degree(n_clients: int) -> int:
    """The complete graph's n-1 for up to 16 clients, else the even k = 2 ceil(2 log2 n) (Bell et al. 2020,
    https://eprint.iacr.org/2020/704: k = O(log n)).

    The survivors' masks leave a partial sum exposed only if their graph falls apart, which on the
    Harary circle takes two runs of k/2 consecutive dropped clients: probability below n^2 delta^k =
    n^(2 - 4 log2(1/delta)) for a dropout rate delta (n^-4.3 at delta = 1/3).
    """
    if n_clients <= COMPLETE_UP_TO:
        return max(n_clients - 1, 1)
    return min(n_clients - 1, 2 * math.ceil(2 * math.log2(n_clients)))


def auto_clip(cfg: RunConfig) -> float:
    """Per-coordinate range that holds every entry of an honest client's delta in this round.

    Each local AdamW step moves a coordinate by at most ``ADAM_STEP_BOUND * lr``; ``central`` deltas are
    L2-clipped to C (so no entry exceeds C); ``local`` adds N(0, (zC)^2) noise to every entry.
    """
    from fedtune.privacy.mechanisms import MECHANISMS  # opacus and torch: not for a site's share and unmask stages

    bound = ADAM_STEP_BOUND * cfg.train.local_steps * cfg.train.lr
    return MECHANISMS.get(cfg.privacy.mechanism).entry_bound(cfg, bound, NOISE_SIGMAS)


@dataclass(frozen=True)
class Params:
    """One round's resolved SecAgg+ parameters."""

    degree: int
    """The degree passed to ``graph.neighbours`` (auto or configured)."""
    effective_degree: int
    """The degree the graph really has for this N (n-1 when complete)."""
    threshold: int
    quant_bits: int
    modulus_bits: int
    clip: float

    def quantizer(self) -> Quantizer:
        return Quantizer(clip=self.clip, bits=self.quant_bits)


def graph_settings(degree_setting: int, threshold_setting: int, n_clients: int) -> tuple[int, int, int]:
    """(degree, effective degree, threshold) that ``secagg.degree`` and ``secagg.threshold`` (0 = auto) give
    for ``n_clients``: what :func:`resolve` puts in a round, and what a client recomputes to check it."""
    degree = degree_setting or auto_degree(n_clients)
    k = effective_degree(max(n_clients, 2), degree)
    return degree, k, threshold_setting or default_threshold(k)


def check_assigned(
    degree_setting: int, threshold_setting: int, n_clients: int, neighbours: int, threshold: int
) -> None:
    """A client's check of the share stage: its ``neighbours`` and ``threshold`` must be what the round's
    ``secagg.degree`` and ``secagg.threshold`` (from the spec the client received) give for the
    ``n_clients`` the server says advertised keys. Raises ``SecAggError`` naming the mismatch."""
    if n_clients < 2 or neighbours >= n_clients:
        raise SecAggError(f"the server says {n_clients} clients advertised keys, but assigned {neighbours} neighbours.")
    _, k, t = graph_settings(degree_setting, threshold_setting, n_clients)
    if (neighbours, threshold) != (k, t):
        raise SecAggError(
            f"the server assigned {neighbours} neighbours and threshold {threshold}, but `secagg.degree` = "
            f"{degree_setting} and `secagg.threshold` = {threshold_setting} (0 = auto) give {k} and {t} for "
            f"{n_clients} clients; refusing the round."
        )


def _choose(cfg: RunConfig, n_clients: int) -> tuple[int, int, float]:
    degree, _, threshold = graph_settings(cfg.secagg.degree, cfg.secagg.threshold, n_clients)
    return degree, threshold, cfg.secagg.clip or auto_clip(cfg)


def threshold(cfg: RunConfig, n_clients: int) -> int:
    """The threshold t (``secagg.threshold``, or auto) a round with ``n_clients`` sampled clients resolves to."""
    return _choose(cfg, n_clients)[1]


def problems(cfg: RunConfig, n_clients: int) -> list[str]:
    """Why ``cfg``'s secagg settings cannot run with ``n_clients`` sampled clients (empty when they can)."""
    degree, threshold, clip = _choose(cfg, n_clients)
    return graph_problems(n_clients, degree, threshold, cfg.secagg.quant_bits, clip)


def resolve(cfg: RunConfig, n_clients: int) -> Params:
    """The round's parameters for ``n_clients``; raises ``ConfigError`` naming every problem."""
    degree, threshold, clip = _choose(cfg, n_clients)
    modulus = check_params(n_clients, degree, threshold, cfg.secagg.quant_bits, clip)
    return Params(degree, effective_degree(n_clients, degree), threshold, cfg.secagg.quant_bits, modulus, clip)
