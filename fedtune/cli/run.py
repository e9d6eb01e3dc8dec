"""``fedtune simulate``, and the run plan that simulate and server both build from their flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedtune.config import RunConfig, Scalar, default_output_dir, parse_assignments
from fedtune.config.plan import Plan
from fedtune.config.presets import PRESETS, preset

DEFAULTS = RunConfig()


def add_run_options(parser: argparse.ArgumentParser, preset_help: str, clients: bool) -> None:
    """The flags that make a run's plan: --preset, --out, --rounds, [--clients,] --seed, --set, --resume."""
    parser.add_argument("--preset", choices=list(PRESETS), help=f"{preset_help} (default: none, the config defaults)")
    parser.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    rounds, sites = DEFAULTS.num_server_rounds, DEFAULTS.simulation.num_supernodes
    parser.add_argument("--rounds", type=int, help=f"num-server-rounds (default: the preset's, else {rounds})")
    if clients:
        parser.add_argument(
            "--clients", type=int, help=f"simulation.num-supernodes (default: the preset's, else {sites})"
        )
    parser.add_argument("--seed", type=int, help=f"seed for everything (default: {DEFAULTS.seed})")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config key (repeatable; default: none)"
    )
    parser.add_argument(
        "--resume", metavar="OUT", help="continue the run in OUT from its last complete checkpoint (default: a new run)"
    )


def plan_from_args(args: argparse.Namespace, extra: dict[str, Scalar] | None = None) -> Plan:
    """The run's plan from --resume, or from --preset, --rounds/--clients/--seed and --set."""
    # torch, transformers and Flower are imported only once the plan is valid, so that a bad key or
    # value is named in about a second
    if args.resume:
        from fedtune.server.checkpoint import saved_plan

        # The run's own config, as its last checkpoint recorded it; only --set may change it.
        out = Path(args.resume).resolve()
        flat = {**saved_plan(out), **parse_assignments(args.set), "output.dir": str(out), "output.resume": True}
        return Plan.from_flat(flat)
    out = Path(args.out or default_output_dir()).resolve()
    flat = preset(args.preset) if args.preset else {}
    flat.update(extra or {})
    for key, value in (
        ("num-server-rounds", args.rounds),
        ("simulation.num-supernodes", getattr(args, "clients", None)),
        ("seed", args.seed),
    ):
        if value is not None:
            flat[key] = value
    flat.update(parse_assignments(args.set))
    flat["output.dir"] = str(out)
    plan = Plan.from_flat(flat)  # validate everything before building or writing anything
    if args.preset == "tiny" and "model.name" not in flat:
        from fedtune.model.tiny import TINY_MODEL_DIR, build_tiny_model

        plan = plan.override({"model.name": str(build_tiny_model(out / TINY_MODEL_DIR))})
    return plan


def add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedtune simulate``: a whole federation on this machine."""
    sim = sub.add_parser("simulate", help="run a whole federation on this machine (Flower simulation engine)")
    add_run_options(sim, "starting config: tiny test model, or the SmolLM2 demo", clients=True)
    sim.add_argument(
        "--baselines",
        metavar="local,centralized",
        help="after the run, train and compare local-only and/or centralized (pooled) baselines (config key baselines)",
    )
    sim.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> None:
    if args.baselines is not None:  # as a --set, so --resume takes it too
        args.set = [*args.set, f"baselines={json.dumps(args.baselines)}"]
    plan = plan_from_args(args)

    from fedtune.simulations.run import simulate

    simulate(plan, resume=bool(args.resume))
