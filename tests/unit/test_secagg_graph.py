"""The SecAgg+ masking graph and threshold rules: regular, symmetric, self-free, random order, clear errors."""

from __future__ import annotations

import random

import pytest

from fedtune.core.errors import ConfigError
from fedtune.privacy.secagg.graph import (
    check_params,
    default_threshold,
    effective_degree,
    neighbours,
    problems,
    share_holders,
)

IDS = [1000 + 7 * i for i in range(12)]


def connected(graph: dict[int, frozenset[int]]) -> bool:
    start = next(iter(graph))
    seen, todo = {start}, [start]
    while todo:
        for j in graph[todo.pop()] - seen:
            seen.add(j)
            todo.append(j)
    return seen == set(graph)


@pytest.mark.parametrize(("n", "degree"), [(12, 2), (12, 3), (12, 4), (12, 5), (11, 4), (12, 10), (9, 6)])
def test_graph_is_k_regular_symmetric_connected_and_self_free(n: int, degree: int) -> None:
    # Execute
    graph = neighbours(IDS[:n], degree, random.Random(0))
    # Assert
    assert set(graph) == set(IDS[:n])
    for i, peers in graph.items():
        assert len(peers) == degree and i not in peers
        assert all(i in graph[j] for j in peers)
    assert connected(graph)


@pytest.mark.parametrize(("n", "degree"), [(3, 2), (4, 4), (5, 4), (2, 9)])
def test_small_groups_get_the_complete_graph(n: int, degree: int) -> None:
    graph = neighbours(IDS[:n], degree)
    assert all(peers == set(IDS[:n]) - {i} for i, peers in graph.items())
    assert effective_degree(n, degree) == n - 1


def test_the_order_is_random_and_reproducible_only_from_a_seeded_rng() -> None:
    assert neighbours(IDS, 4, random.Random(1)) == neighbours(IDS, 4, random.Random(1))
    graphs = {tuple(sorted((i, tuple(sorted(p))) for i, p in neighbours(IDS, 4).items())) for _ in range(5)}
    assert len(graphs) > 1  # SystemRandom: five equal circulants of 12 clients is vanishingly unlikely


def test_odd_degree_on_an_odd_count_is_refused() -> None:
    with pytest.raises(ConfigError, match="no 3-regular graph on 11"):
        neighbours(IDS[:11], 3)


def test_share_holders_are_the_neighbours_and_the_client_in_id_order() -> None:
    graph = neighbours(IDS, 4, random.Random(0))
    for i in IDS:
        assert share_holders(graph, i) == sorted([*graph[i], i])


@pytest.mark.parametrize("degree", range(1, 30))
def test_default_threshold_is_the_smallest_strict_majority_of_holders(degree: int) -> None:
    t = default_threshold(degree)
    holders = degree + 1
    assert 2 * t > holders >= 2 * (t - 1)
    assert t <= holders


def test_check_params_returns_the_modulus_bits() -> None:
    assert check_params(10, 4, 3, 16, 0.5) == 20
    assert check_params(3, 8, 2, 8, 1.0) == 10  # complete graph: 3 holders


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 4, 2, 16, 0.5), "strict majority of the 5 share holders"),  # 2t <= k+1
        ((10, 4, 6, 16, 0.5), "in 3..5, got 6"),  # more than the holders
        ((3, 8, 1, 8, 1.0), "of the 3 share holders"),  # checked against the effective degree
        ((9, 3, 3, 8, 1.0), "no 3-regular graph on 9"),
        ((1000, 10, 6, 23, 1.0), "uint32"),
        ((10, 4, 3, 8, 0.0), "clip"),
        ((1, 4, 3, 8, 1.0), "at least 2 clients"),
        ((10, 0, 3, 8, 1.0), "degree must be >= 1"),
    ],
)
def test_check_params_names_the_value_at_fault(args: tuple[int, int, int, int, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_params(*args)


def test_every_problem_is_reported_at_once() -> None:
    assert len(problems(1000, 4, 1, 30, -1.0)) == 3
