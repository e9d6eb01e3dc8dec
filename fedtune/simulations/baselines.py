"""Baselines in the same run: local-only and centralized (pooled) training, against the federated model.

After a simulated federation (``baselines`` = ``local,centralized``), on the same data, base model,
seed and held-out sets, in this process on the resident base model (the ``shared`` backend's; no
Ray), with progress bars:

- **local-only**: each site fine-tunes alone from the run's initial state (its own LoRA rank), with
  the same optimizer and the number of local steps it did across all federated rounds;
- **centralized**: one model (the global rank) on the union of the sites' training examples, with
  the steps of all sites together: the upper bound that privacy forbids.

Every model (the base, the federated one, each baseline) is evaluated as the run evaluates the
federated model: on the server's held-out set and on each site's own held-out split, with the run's
``eval.metrics`` (the same functions, on the same examples). ``baselines_report`` writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedtune.client.site import Site, open_site
from fedtune.client.trainer import train_local
from fedtune.config import RunConfig
from fedtune.config.baselines import CENTRALIZED, LOCAL, parse_baselines
from fedtune.config.plan import Plan
from fedtune.core.arrays import Arrays
from fedtune.core.errors import FedtuneError
from fedtune.data.prompts import Example
from fedtune.model import task_metrics
from fedtune.model.adapters import adapter_arrays, load_adapter_arrays
from fedtune.model.generation import task_scores
from fedtune.model.hardware import server_model
from fedtune.model.loading import pick_device
from fedtune.model.lora import rank_slice
from fedtune.model.methods import initial_state, load_for, wrap
from fedtune.model.scoring import heldout_loss
from fedtune.server import checkpoint
from fedtune.server.evaluation import CentralEvaluator
from fedtune.server.record import RoundRecord
from fedtune.server.report.files import METRICS_FILE, SUMMARY_FILE
from fedtune.simulations import baselines_report
from fedtune.simulations.baselines_report import SERVER
from fedtune.wire import keys

log = logging.getLogger(__name__)

Metrics = dict[str, float]
Evals = dict[str, dict[str, Metrics]]
"""Model row ("base", "federated", "centralized", "local site 0", ...) -> set name -> metric -> value."""


def site_steps(plan: Plan, history: list[RoundRecord], backend: str) -> dict[int, int]:
    """Local steps each site (by partition id) trained across the federated rounds: the round's
    ``train.local-steps`` for every node whose update the round accepted. Under the ``shared``
    backend node ``k + 1`` is partition ``k``; under Ray every site must have trained every round."""
    n = plan.base.simulation.num_supernodes
    by_node: dict[int, int] = {}
    for record in history[1:] if history and history[0].round == 0 else history:
        if record.replied and record.replied_nodes is None:
            raise FedtuneError("`baselines`: metrics.jsonl does not say which sites trained (node ids withheld).")
        for node in record.replied_nodes or []:
            by_node[node] = by_node.get(node, 0) + plan.for_round(record.round).train.local_steps
    if backend == "shared":
        return {pid: by_node.get(pid + 1, 0) for pid in range(n)}
    counts = set(by_node.values())
    if len(by_node) != n or len(counts) != 1:
        raise FedtuneError(
            "`baselines`: the sites trained different numbers of rounds, and Ray's node ids do not say which "
            "site is which; rerun with `simulation.backend` = shared."
        )
    return dict.fromkeys(range(n), counts.pop())


@dataclass
class Setup:
    """What every baseline shares: the config, the sites (data and resident model), the server's
    held-out set and the run's initial state."""

    cfg: RunConfig
    sites: list[Site]
    server: CentralEvaluator
    initial: Arrays


def _setup(cfg: RunConfig) -> Setup:
    n = cfg.simulation.num_supernodes
    sites = [open_site(cfg, {keys.PARTITION_ID: pid, keys.NUM_PARTITIONS: n}) for pid in range(n)]
    loaded = load_for(cfg, pick_device("auto"), server_model(cfg.model))
    initial = initial_state(loaded, cfg)
    return Setup(cfg, sites, CentralEvaluator(cfg, loaded, base_arrays=initial), initial)


def evaluate(
    model: Any, tokenizer: Any, examples: list[Example], records: list[dict[str, Any]], cfg: RunConfig
) -> Metrics:
    """``eval.metrics`` of ``model`` on one held-out set, with the functions the run evaluates with."""
    out: Metrics = {}
    if not examples:
        return out
    if task_metrics.LOSS in cfg.eval.metric_names():
        pad_id = int(tokenizer.pad_token_id)
        out[task_metrics.LOSS] = heldout_loss(model, examples, batch_size=cfg.eval.batch_size, pad_id=pad_id)
    scores, _ = task_scores(model, tokenizer, records, cfg.data, cfg.eval)
    return {**out, **scores}


def _model(setup: Setup, arrays: Arrays, site: Site | None = None) -> Any:
    """``arrays`` loaded into the global-rank model (``site`` None) or into ``site``'s model at its
    rank, as the site's ClientApp loads the global adapter."""
    if site is None:
        model = wrap(setup.server.loaded, setup.cfg)
        load_adapter_arrays(model, arrays)
        return model
    model = site.model(setup.cfg)
    load_adapter_arrays(model, rank_slice(arrays, site.rank))
    return model


def _eval_global(setup: Setup, arrays: Arrays) -> dict[str, Metrics]:
    """A global-rank state on the server's set and on every site's held-out split (at the site's rank)."""
    cfg, server = setup.cfg, setup.server
    out = {SERVER: evaluate(_model(setup, arrays), server.loaded.tokenizer, server.examples, server.records, cfg)}
    for site in setup.sites:
        model = _model(setup, arrays, site)
        out[site.name] = evaluate(model, site.loaded.tokenizer, site.heldout, site.heldout_records, cfg)
    return {k: v for k, v in out.items() if v}


def _train(model: Any, examples: list[Example], steps: int, setup: Setup, label: str) -> tuple[Arrays, int]:
    """``steps`` AdamW steps (``train.*``, as each federated round's local training) on ``examples``;
    the trained state and the steps taken."""
    if steps == 0:  # a site the federation never sampled: its local-only model is the base
        return adapter_arrays(model), 0
    cfg = setup.cfg
    seed = zlib.crc32(f"{cfg.seed}:baseline:{label}".encode())
    torch.manual_seed(seed)  # LoRA dropout
    result = train_local(
        model,
        examples,
        dataclasses.replace(cfg.train, local_steps=steps),
        pad_id=int(setup.server.loaded.tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(seed),
        desc=label,
    )
    return adapter_arrays(model), result.steps


def _local_only(setup: Setup, site: Site, steps: int, evals: Evals, trained: dict[str, int]) -> None:
    model = _model(setup, setup.initial, site)
    arrays, trained[site.name] = _train(model, site.train, steps, setup, f"local-only {site.name}")
    model = _model(setup, arrays, site)
    cfg, tok = setup.cfg, site.loaded.tokenizer
    found = {SERVER: evaluate(model, tok, setup.server.examples, setup.server.records, cfg)}
    found[site.name] = evaluate(model, tok, site.heldout, site.heldout_records, cfg)
    evals[f"local {site.name}"] = {k: v for k, v in found.items() if v}


def _centralized(setup: Setup, steps: int, evals: Evals, trained: dict[str, int]) -> None:
    pooled = [e for site in setup.sites for e in site.train]  # the union of the sites' training data
    arrays, trained[CENTRALIZED] = _train(_model(setup, setup.initial), pooled, steps, setup, "centralized")
    evals[CENTRALIZED] = _eval_global(setup, arrays)


def read_history(out: Path) -> list[RoundRecord]:
    """The run's rounds as ``metrics.jsonl`` holds them."""
    lines = (out / METRICS_FILE).read_text().splitlines()
    return [RoundRecord.from_json(json.loads(line)) for line in lines if line.strip()]


def run_baselines(plan: Plan, out: Path) -> dict[str, Any]:
    """Train and evaluate the baselines ``baselines`` names after the run in ``out``; write
    ``OUT/baselines.json`` and ``OUT/plots/baselines.png``, log the table and the headline line."""
    cfg = plan.base
    kinds = parse_baselines(cfg.baselines)
    steps = site_steps(plan, read_history(out), cfg.simulation.backend)
    log.info("Baselines (%s) on the run's data, base model, seed and held-out sets", ", ".join(kinds))
    setup = _setup(cfg)
    final = checkpoint.load(checkpoint.latest(out)).global_arrays
    evals: Evals = {}
    trained: dict[str, int] = {}
    stages: list[tuple[str, Callable[[], None]]] = [
        ("base", lambda: evals.__setitem__("base", _eval_global(setup, setup.initial))),
        ("federated", lambda: evals.__setitem__("federated", _eval_global(setup, final))),
    ]
    if LOCAL in kinds:
        for pid, site in enumerate(setup.sites):
            stages.append((f"local-only {site.name}", _bind_local(setup, site, steps[pid], evals, trained)))
    if CENTRALIZED in kinds:
        stages.append(("centralized", lambda: _centralized(setup, sum(steps.values()), evals, trained)))
    bar = tqdm(stages, desc="baselines", unit="model")
    for label, stage in bar:
        bar.set_postfix_str(label, refresh=False)
        stage()
    bar.close()
    _model(setup, setup.initial)  # bitfit / full trained the resident weights: put the base back
    summary_path = out / SUMMARY_FILE
    privacy = json.loads(summary_path.read_text()).get("privacy") if summary_path.is_file() else None
    names = [s.name for s in setup.sites]
    federated_steps = {s.name: steps[pid] for pid, s in enumerate(setup.sites)}
    result = baselines_report.build(cfg, evals, names, federated_steps, trained, privacy)
    baselines_report.write(out, result)
    return result


def _bind_local(setup: Setup, site: Site, steps: int, evals: Evals, trained: dict[str, int]) -> Callable[[], None]:
    return lambda: _local_only(setup, site, steps, evals, trained)
