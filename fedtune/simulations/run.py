"""Run a whole federation locally with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os

from fedtune.client.app import app as client_app
from fedtune.config.plan import Plan
from fedtune.core.errors import ConfigError
from fedtune.core.logs import quiet_flower, setup_logging
from fedtune.data.loaders import load_eval_records, load_records, train_source
from fedtune.data.partition import site_partition, train_heldout
from fedtune.data.prompts import check_format
from fedtune.model.hardware import check_site
from fedtune.model.methods import check_model_files
from fedtune.model.sources import load_tokenizer, resolve_model
from fedtune.privacy import compat
from fedtune.server.app import make_server_app, run_server
from fedtune.simulations.local import LocalGrid

log = logging.getLogger(__name__)


def precheck(plan: Plan) -> None:
    """Everything that can be checked before Ray starts: plan, model, data, every partition."""
    compat.check(plan)
    cfg = plan.base
    n = cfg.simulation.num_supernodes
    if cfg.server.min_clients > n:
        raise ConfigError(
            f"`server.min-clients` ({cfg.server.min_clients}) exceeds the {n} simulated sites "
            "(`simulation.num-supernodes` / --clients)."
        )
    check_site(cfg, "the simulated sites")
    path = resolve_model(cfg.model)
    check_model_files(cfg, path)
    check_format(cfg.data, load_tokenizer(path), cfg.model.name)
    rows = load_records(train_source(cfg.data), cfg.data)
    for pid in range(n):
        part = site_partition(rows, cfg.data, pid, n, cfg.seed)
        train_heldout(part, cfg.data, cfg.seed, f"site {pid} (of `data.path` by `data.partitioner`)")
    load_eval_records(cfg.data)


def simulate(plan: Plan, *, resume: bool = False) -> None:
    """Check ``plan``, then run it on Flower's simulation engine (1 CPU per client by default) or
    on the in-process ``shared`` backend; ``resume`` continues from the last checkpoint."""
    precheck(plan)
    if plan.base.simulation.backend == "shared":
        setup_logging()
        run_server(plan, LocalGrid(client_app, plan.base.simulation.num_supernodes), resume=resume)
        return
    if plan.base.train.num_threads == 0:
        # Each simulated client gets simulation.num-cpus cores; more torch threads oversubscribe.
        plan = plan.override({"train.num-threads": plan.base.simulation.num_cpus})
    cfg = plan.base
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # per-site progress lines look alike; keep them all
    from flwr.simulation import run_simulation

    quiet_flower()

    backend = {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": cfg.simulation.num_gpus},
        "init_args": {"logging_level": "error", "log_to_driver": True},
    }
    run_simulation(
        server_app=make_server_app(plan.to_flat(), resume=resume, announce=False),
        client_app=client_app,
        num_supernodes=cfg.simulation.num_supernodes,
        backend_config=backend,  # type: ignore[arg-type]
    )
