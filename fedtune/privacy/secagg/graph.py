"""Who masks with whom in SecAgg+: a random k-regular graph (or the complete graph), and threshold rules.

Bell et al. 2020 (https://eprint.iacr.org/2020/704, §3-4) replace the complete graph of SecAgg
(Bonawitz et al. 2017, https://eprint.iacr.org/2017/281) by a k-regular one with k = O(log n): each
client masks with, and shares its secrets among, only its k neighbours. Here the graph is a Harary
graph H(k, n), a circulant linking each position to the k/2 nearest on either side (and, for odd k,
the opposite one), laid over a random order of the clients. When n <= k+1 it is the complete graph.

Share holders: a client's secrets are split among its neighbours and itself (k+1 holders, as
Flower's ``num_shares`` counts them), so that with the complete graph a round survives up to
n - t dropouts.

Threshold: in the unmask stage each holder reveals, for a client i, the share of either its self-mask
seed b_i (i survived) or of its mask secret key (i dropped), never both. A server that lies about
who dropped may ask some holders for one and the rest for the other; it gets both secrets of i, and
with them i's input, only if 2t <= k+1 (i itself never reveals its key share). So t must be a strict
majority of the k+1 holders: t > (k+1)/2 (the argument of Bonawitz et al. 2017, §6.3, applied to a
neighbourhood). Each holder colluding with the server lowers the margin by one more share.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from fedtune.core.errors import ConfigError
from fedtune.privacy.secagg.quantize import modulus_bits


def effective_degree(n_clients: int, degree: int) -> int:
    """The degree the graph really has: ``degree``, or n-1 when the complete graph is used (n <= degree+1)."""
    return min(degree, n_clients - 1)


def neighbours(ids: Sequence[int], degree: int, rng: random.Random | None = None) -> dict[int, frozenset[int]]:
    """Each client's neighbours (itself excluded) in a symmetric, ``effective_degree``-regular graph.

    The clients are placed on a circle in an order shuffled by ``rng`` (``random.SystemRandom()``
    when None; pass a seeded ``random.Random`` only to reproduce a graph, never to protect anyone).
    """
    n = len(ids)
    if len(set(ids)) != n:
        raise ConfigError(f"client ids must be distinct, got {list(ids)}.")
    if n <= degree + 1:
        return {i: frozenset(ids) - {i} for i in ids}
    if degree < 1:
        raise ConfigError(f"secure-aggregation degree must be >= 1, got {degree}.")
    if degree % 2 and n % 2:
        raise ConfigError(
            f"no {degree}-regular graph on {n} clients exists (odd degree, odd count); use an even degree."
        )
    order = list(ids)
    (rng or random.SystemRandom()).shuffle(order)
    offsets = list(range(1, degree // 2 + 1)) + ([n // 2] if degree % 2 else [])
    links: dict[int, set[int]] = {i: set() for i in ids}
    for pos, i in enumerate(order):
        for off in offsets:
            j = order[(pos + off) % n]
            links[i].add(j)
            links[j].add(i)
    return {i: frozenset(peers) for i, peers in links.items()}


def share_holders(graph: dict[int, frozenset[int]], client: int) -> list[int]:
    """The clients that hold shares of ``client``'s secrets, in share-index order: its neighbours and itself."""
    return sorted(graph[client] | {client})


def default_threshold(degree: int) -> int:
    """The smallest safe threshold for ``degree`` neighbours: a strict majority of the degree+1 holders."""
    return (degree + 1) // 2 + 1


def problems(n_clients: int, degree: int, threshold: int, bits: int, clip: float) -> list[str]:
    """Every reason the settings cannot run SecAgg+ (empty when they can), each naming the value at fault.

    ``degree`` and ``threshold`` are checked against the effective degree of the graph for ``n_clients``.
    """
    found = []
    if n_clients < 2:
        found.append(f"secure aggregation needs at least 2 clients, got {n_clients}.")
    if degree < 1:
        found.append(f"degree must be >= 1, got {degree}.")
    if not (math.isfinite(clip) and clip > 0):
        found.append(f"clip must be a finite number > 0, got {clip}.")
    if n_clients >= 2 and degree >= 1:
        k = effective_degree(n_clients, degree)
        if n_clients > degree + 1 and degree % 2 and n_clients % 2:
            found.append(f"no {degree}-regular graph on {n_clients} clients exists (odd degree, odd count).")
        if not (k + 1) / 2 < threshold <= k + 1:
            found.append(
                f"threshold must be a strict majority of the {k + 1} share holders (a client and its {k} "
                f"neighbours), i.e. in {default_threshold(k)}..{k + 1}, got {threshold}; with 2t <= k+1 a server "
                "could rebuild both the self-mask seed and the mask key of one client."
            )
    try:
        modulus_bits(max(n_clients, 1), bits)
    except ValueError as e:
        found.append(str(e))
    return found


def check_params(n_clients: int, degree: int, threshold: int, bits: int, clip: float) -> int:
    """The modulus bits b for these settings; raises ``ConfigError`` listing every problem at once."""
    found = problems(n_clients, degree, threshold, bits, clip)
    if found:
        raise ConfigError("secure aggregation settings are invalid: " + " ".join(found))
    return modulus_bits(n_clients, bits)
