"""Flower's own SecAgg+ (legacy API) beside Flower's plain FedAvg, on the benchmark's serializing grid.

A legacy ``ServerApp`` body: ``DefaultWorkflow`` with ``SecAggPlusWorkflow`` as its fit workflow (or
Flower's default fit workflow for the plain baseline), a legacy ``FedAvg`` and a ``NumPyClient`` wrapped
with ``secaggplus_mod``. SecAgg+ is legacy-only in flwr 1.41 (STACK-NOTES.md), so this file is the only
place fedtune touches that API. The client does no training: ``fit`` returns the parameters plus a
fixed delta, so Flower's rounds cost only messaging and (for SecAgg+) the protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from secagg_wire import WireGrid  # a sibling file: run as benchmarks/secagg_round.py

Workflow = Callable[[Any, Any], None]


class _Client(NumPyClient):  # type: ignore[misc]
    def __init__(self, delta: list[np.ndarray]) -> None:
        self.delta = delta

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        return [p + d for p, d in zip(parameters, self.delta, strict=True)], 10, {}


def _timed(workflow: Workflow, seconds: list[float]) -> Workflow:
    def run(grid: Any, context: Any) -> None:
        start = time.perf_counter()
        workflow(grid, context)
        seconds.append(time.perf_counter() - start)

    return run


def _no_evaluation(grid: Any, context: Any) -> None:
    return None


def flower_run(
    shapes: list[tuple[int, ...]], n: int, rounds: int, secagg: tuple[int, int] | None
) -> list[dict[str, float]]:
    """Per round: fit-workflow seconds and wire bytes up+down per client. ``secagg``: (num_shares, threshold)."""
    rng = np.random.default_rng(0)
    start = [rng.normal(0, 0.02, s).astype(np.float32) for s in shapes]
    pool = [[rng.normal(0, 1e-3, s).astype(np.float32) for s in shapes] for _ in range(3)]

    def client_fn(context: Context) -> Any:
        return _Client(pool[int(context.node_id) % len(pool)]).to_client()

    app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])
    grid = WireGrid(app, n)
    seconds: list[float] = []
    fit: Workflow = default_fit_workflow
    if secagg:
        fit = SecAggPlusWorkflow(num_shares=secagg[0], reconstruction_threshold=secagg[1])
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(start),
    )
    context = LegacyContext(
        context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    DefaultWorkflow(fit_workflow=_timed(fit, seconds), evaluate_workflow=_no_evaluation)(grid, context)
    if len(seconds) != rounds:
        raise RuntimeError(f"Flower ran {len(seconds)} of {rounds} rounds")
    return [
        {"seconds": seconds[r - 1], "bytes_per_client": (grid.down[str(r)] + grid.up[str(r)]) / n}
        for r in range(1, rounds + 1)
    ]
