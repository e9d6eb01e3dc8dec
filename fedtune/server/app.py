"""Flower ServerApp: a thin edge that builds the run from config and hands Flower's grid to the loop."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import RunConfig, default_output_dir, from_run_config
from fedtune.config.plan import Plan
from fedtune.core.atomic import write_atomic_dir
from fedtune.core.errors import ConfigError
from fedtune.core.logs import block, quiet_libraries, setup_logging
from fedtune.model.hardware import server_model
from fedtune.model.loading import pick_device
from fedtune.model.methods import initial_state, load_for
from fedtune.model.sources import base_source
from fedtune.privacy import compat
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.server import checkpoint, farewell, loop, site_metrics, traffic
from fedtune.server.evaluation import CentralEvaluator
from fedtune.server.final_sample import FinalSample
from fedtune.server.outputs import Writer
from fedtune.server.record import RoundRecord
from fedtune.server.report import SUMMARY_FILE, Reporter, privacy_line, privacy_summary, secagg_summary
from fedtune.server.state import GridLike, ServerState
from fedtune.server.tracking import Tracking

log = logging.getLogger(__name__)


quiet_libraries()  # this module is the process entry point under `flwr run` / deployment


def output_dir(cfg: RunConfig) -> Path:
    """``output.dir``, or ``runs/<timestamp>`` when it is empty."""
    return Path(cfg.output.dir or default_output_dir())


def run_server(plan: Plan, grid: GridLike, *, resume: bool = False, flower_run_id: int | None = None) -> dict[str, Any]:
    """The whole server job: init the adapter (or resume from the last complete checkpoint), run
    every round, write outputs; returns the summary extras."""
    compat.check(plan)
    cfg = plan.base
    resume = resume or cfg.output.resume
    out = output_dir(cfg)
    reporter = Reporter(out)
    if not resume and reporter.path.exists():
        raise ConfigError(f"{out} already holds a run; resume it with --resume {out}, or choose another --out.")
    tracking = Tracking(cfg, out)  # a missing tracker package stops the run here, before round 1
    try:
        return _serve(plan, grid, out, reporter, tracking, resume=resume, flower_run_id=flower_run_id)
    finally:
        tracking.finish()  # after an error (a finished run has closed them with its files)


def _serve(
    plan: Plan,
    grid: GridLike,
    out: Path,
    reporter: Reporter,
    tracking: Tracking,
    *,
    resume: bool,
    flower_run_id: int | None,
) -> dict[str, Any]:
    """:func:`run_server` once its output directory and trackers are settled."""
    cfg = plan.base
    # The server holds the base model for the seeded initial state and centralized evaluation.
    loaded = load_for(cfg, pick_device("auto"), server_model(cfg.model))
    initial = initial_state(loaded, cfg)  # seeded: the same initial global state whatever ran before
    state = ServerState(
        round=0, global_arrays=initial, rng=np.random.default_rng(cfg.seed), run_id=secrets.token_hex(8)
    )
    if resume:
        state = checkpoint.load(checkpoint.latest(out))
        reporter.truncate(state.round)
        log.info("Resuming %s after round %d", out, state.round)
    evaluator = CentralEvaluator(cfg, loaded, base_arrays=initial)
    writer = Writer(cfg, loaded)
    out.mkdir(parents=True, exist_ok=True)
    reporter.start(plan)
    note = site_metrics.NOT_COVERED if MECHANISMS.get(privacy_summary(plan, state)["mechanism"]).dp else None

    sample = FinalSample(evaluator)

    def on_round(s: ServerState, record: RoundRecord) -> None:
        sample.wait()  # the sample answers, started at the last round's evaluation, use the server's model
        checkpoint.save(out, s, plan, writer.checkpoint)
        tracking.row(reporter.row(record))
        site_metrics.write_sites(out, s.history, note)

    state = loop.run(plan, grid, state, evaluate=evaluator, on_round=on_round, on_final=sample.start)
    sample.wait()
    final = out / writer.final_name()
    write_atomic_dir(final, lambda tmp: writer.final(tmp, state.global_arrays))
    extra = _summary(plan, state, loaded.path, final, writer.final_name(), sample, flower_run_id)
    reporter.finish(cfg, state.history, extra)
    tracking.finish(final, reporter.out / SUMMARY_FILE)
    log.info("%s", privacy_line(extra["privacy"]))
    log.info(
        "Outputs in %s (metrics.jsonl, sites.json, rounds.md, plots/, %s/, summary.json)", *(out, writer.final_name())
    )
    return extra


def _summary(
    plan: Plan,
    state: ServerState,
    base_path: str,
    final: Path,
    final_name: str,
    sample: FinalSample,
    flower_run_id: int | None,
) -> dict[str, Any]:
    """``summary.json``'s extras: the model and its source, privacy, traffic, a sample answer, task metrics."""
    cfg = plan.base
    extra: dict[str, Any] = {"base_model": base_path, final_name: str(final), "run_id": state.run_id}
    extra["base_model_source"] = base_source(cfg.model, base_path)
    extra["peft_method"] = cfg.peft.method
    if flower_run_id is not None:  # Flower's id of this run (a resumed run gets a new one)
        extra["flower_run_id"] = flower_run_id
    extra["privacy"] = privacy_summary(plan, state)
    extra["communication"] = traffic.communication_summary(cfg, state)
    if (secure := secagg_summary(plan)) is not None:
        extra["secure_aggregation"] = secure
    answers = sample.result(state.global_arrays)
    if answers is not None:
        extra["sample"] = answers
        log.info(
            "\nHeld-out prompt: %s\n  reference : %s\n  base model: %s\n  fine-tuned: %s",
            *(block(text, 14 if i else 17) for i, text in enumerate(extra["sample"].values())),
        )
    if (task := site_metrics.base_vs_final(state.history)) is not None:
        extra["task_metrics"] = task
        log.info("%s", site_metrics.base_vs_final_line(task))
    return extra


def make_server_app(
    overrides: Mapping[str, Any] | None = None, *, resume: bool = False, announce: bool = True
) -> ServerApp:
    """A ServerApp whose config is Flower's run_config with ``overrides`` on top; with ``announce``,
    the connected sites are told when the run finished (:mod:`fedtune.server.farewell`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()
        plan = from_run_config(context.run_config, overrides)
        run_server(plan, grid, resume=resume, flower_run_id=context.run_id)
        if announce:
            farewell.announce(grid, plan.base.num_server_rounds)

    return server_app


app = make_server_app()
