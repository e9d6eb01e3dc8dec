"""The ``fedtune`` command: simulate, keys, server, client, privacy, fetch-model, export, chat, evaluate.

One module per command group (``run``: simulate; ``deploy``: keys, server, client; ``calc``: the
privacy calculators; ``fetch``: fetch-model; ``export``; ``chat``; ``evaluate``). Each adds its
subcommands to the parser and imports what it runs only when it runs, so ``fedtune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from fedtune.cli import calc, chat, deploy, evaluate, export, fetch, run
from fedtune.core.errors import FedtuneError
from fedtune.core.logs import VERBOSE_ENV, quiet_libraries, readable_flower, setup_logging

log = logging.getLogger("fedtune.cli")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of LLM adapters on Flower.")
    parser.add_argument("--version", action="version", version=f"fedtune {_version()}")
    parser.add_argument("--verbose", action="store_true", help="show DEBUG lines, Flower's too (default: off)")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_simulate(sub)
    deploy.add_keys(sub)
    deploy.add_server(sub)
    deploy.add_client(sub)
    calc.add_privacy(sub)
    fetch.add_fetch_model(sub)
    export.add_export(sub)
    chat.add_chat(sub)
    evaluate.add_evaluate(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedtune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (every ``finally`` stops what it started), exit status 143."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line and exit status 1 for bad input, never a traceback wall."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the processes fedtune starts (Ray workers, site workers) too
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    readable_flower(args.verbose)
    # SIGTERM unwinds like Ctrl-C, so the Flower processes fedtune started are stopped too.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("fedtune: stopped (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130
    return 0
