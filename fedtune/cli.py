"""The ``fedtune`` command: simulate a federation, fetch the demo model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from fedtune.config import parse_assignments
from fedtune.errors import FedtuneError
from fedtune.logs import quiet_libraries, setup_logging
from fedtune.strategies.plan import Plan

log = logging.getLogger("fedtune.cli")


def _simulate(args: argparse.Namespace) -> None:
    from fedtune.server.checkpoint import saved_plan
    from fedtune.simulations.presets import TINY_MODEL_DIR, build_tiny_model, preset
    from fedtune.simulations.run import simulate

    if args.resume:
        # The run's own config, as its last checkpoint recorded it; only --set may change it.
        flat = {**saved_plan(Path(args.resume)), **parse_assignments(args.set)}
        flat["output.dir"] = str(Path(args.resume).resolve())
        simulate(Plan.from_flat(flat), resume=True)
        return
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    flat = preset(args.preset) if args.preset else {}
    for key, value in (
        ("num-server-rounds", args.rounds),
        ("simulation.num-supernodes", args.clients),
        ("seed", args.seed),
    ):
        if value is not None:
            flat[key] = value
    flat.update(parse_assignments(args.set))
    flat["output.dir"] = str(out)
    plan = Plan.from_flat(flat)  # validate everything before building or writing anything
    if args.preset == "tiny" and "model.name" not in flat:
        model_dir = build_tiny_model(out / TINY_MODEL_DIR, seed=plan.base.seed)
        plan = plan.override({"model.name": str(model_dir)})
    simulate(plan)


def _fetch_model(args: argparse.Namespace) -> None:
    from fedtune.models import fetch_smollm2

    path = fetch_smollm2()
    print(path)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of LLM adapters on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a whole federation on this machine (Flower simulation engine)")
    sim.add_argument(
        "--preset", choices=["tiny", "smollm2"], help="starting config: tiny test model, or the SmolLM2 demo"
    )
    sim.add_argument("--out", help="run directory (default runs/<timestamp>)")
    sim.add_argument("--rounds", type=int, help="num-server-rounds")
    sim.add_argument("--clients", type=int, help="simulated sites (simulation.num-supernodes)")
    sim.add_argument("--seed", type=int, help="seed for everything")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key (repeatable)")
    sim.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last complete checkpoint")
    sim.set_defaults(func=_simulate)

    fetch = sub.add_parser("fetch-model", help="cache the demo model locally (dequantized once)")
    fetch.add_argument("name", choices=["smollm2"])
    fetch.set_defaults(func=_fetch_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line and exit status 1 for bad input, never a traceback wall."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
