"""Run a whole federation locally with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
import sys

import torch

from fedtune.client.app import app as client_app
from fedtune.config.baselines import parse_baselines
from fedtune.config.plan import Plan
from fedtune.core.errors import ConfigError
from fedtune.core.logs import CONSOLE_ENV, quiet_flower, setup_logging
from fedtune.data.loaders import load_eval_records, load_records, train_source
from fedtune.data.partition import site_partition, train_heldout
from fedtune.data.prompts import check_format
from fedtune.model import threads
from fedtune.model.hardware import check_site
from fedtune.model.methods import check_model_files
from fedtune.model.sources import load_tokenizer, resolve_model
from fedtune.privacy import compat
from fedtune.privacy.rounds import federated_eval
from fedtune.server import tracking
from fedtune.server.app import make_server_app, output_dir, run_server
from fedtune.simulations import baselines
from fedtune.simulations.local import LocalGrid
from fedtune.simulations.ray_cluster import backend_config

log = logging.getLogger(__name__)


def precheck(plan: Plan) -> None:
    """Everything that can be checked before Ray starts: plan, model, data, every partition."""
    compat.check(plan)
    cfg = plan.base
    tracking.chosen(cfg)  # a missing tracker package, before Ray starts
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
        threads.announce(1)  # the sites take turns in this process
        run_server(plan, LocalGrid(client_app, plan.base.simulation.num_supernodes), resume=resume)
    else:
        _simulate_ray(plan, resume)
    if parse_baselines(plan.base.baselines):  # after the federated run, in this process (no Ray)
        baselines.run_baselines(plan, output_dir(plan.base))


def _simulate_ray(plan: Plan, resume: bool) -> None:
    """The federation on Flower's simulation engine (Ray backend)."""
    cfg = plan.base
    cores = threads.usable_cores()
    # Ray runs as many clients at once as its CPUs allow (simulation.num-cpus each); each site's
    # auto thread count (train.num-threads = 0) divides the cores among them.
    concurrent = min(cfg.simulation.num_supernodes, max(1, cores // cfg.simulation.num_cpus))
    threads.announce(concurrent)
    if not cfg.simulation.ray_address and any(federated_eval(plan, c) for c in plan.configs()):
        # this process's centralized evaluation and sample answers overlap with the clients' federated
        # evaluation on the same cores: torch's default (a thread per core) would oversubscribe them
        server = threads.beside(concurrent)
        torch.set_num_threads(server.threads)
        threads.log_choice("the server", server)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # per-site progress lines look alike; keep them all
    os.environ[CONSOLE_ENV] = "1"  # each site's start-up report, from its Ray worker
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray colours its worker prefixes by default
    from flwr.simulation import run_simulation

    quiet_flower()

    backend = backend_config(cfg)
    if not cfg.simulation.ray_address:  # a new local Ray gets the cores this process may use
        backend["init_args"]["num_cpus"] = max(cores, cfg.simulation.num_cpus)
    else:
        log.info("simulation: attaching to the Ray cluster at %s", cfg.simulation.ray_address)
    run_simulation(
        server_app=make_server_app(plan.to_flat(), resume=resume, announce=False),
        client_app=client_app,
        num_supernodes=cfg.simulation.num_supernodes,
        backend_config=backend,
    )
