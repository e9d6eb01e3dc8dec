"""The ``fedtune`` command: simulate, keys, server, client, fetch-model."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from fedtune.config import Scalar, default_output_dir, parse_assignments
from fedtune.config.plan import Plan
from fedtune.core.errors import FedtuneError
from fedtune.core.logs import quiet_libraries, setup_logging

log = logging.getLogger("fedtune.cli")


def _plan(args: argparse.Namespace, extra: dict[str, Scalar] | None = None) -> Plan:
    """The run's plan from --resume, or from --preset, --rounds/--clients/--seed and --set."""
    from fedtune.model.tiny import TINY_MODEL_DIR, build_tiny_model
    from fedtune.server.checkpoint import saved_plan
    from fedtune.simulations.presets import preset

    if args.resume:
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
        plan = plan.override({"model.name": str(build_tiny_model(out / TINY_MODEL_DIR))})
    return plan


def _simulate(args: argparse.Namespace) -> None:
    from fedtune.simulations.run import simulate

    simulate(_plan(args), resume=bool(args.resume))


def _keys(args: argparse.Namespace) -> None:
    from fedtune.deploy.keys import make_keys

    layout = make_keys(Path(args.out), args.nodes, args.hosts.split(","))
    print(f"Wrote {layout.ca}, {layout.server_cert}, {layout.server_key}")
    print(f"and {args.nodes} SuperNode key pair(s) in {layout.root / 'nodes'} (private keys: mode 0600)")


def _server(args: argparse.Namespace) -> None:
    from fedtune.deploy.keys import KeyLayout
    from fedtune.deploy.server import serve

    out = serve(_plan(args), KeyLayout(Path(args.keys)), args.address, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"Run finished: {out}")


def _client(args: argparse.Namespace) -> None:
    from fedtune.client import channel
    from fedtune.deploy import client
    from fedtune.wire import keys

    for flag, path in (("--root-cert", args.root_cert), ("--auth-key", args.auth_key)):
        if path is not None and not Path(path).is_file():
            raise FedtuneError(f"`{flag}`: no such file: {path}")
    if args.root_cert is None and not args.insecure:
        raise FedtuneError("`--root-cert` is required (the CA that signed the server certificate), or --insecure.")
    config = client.build_node_config(
        data=Path(args.data) if args.data else None,
        preset=args.preset,
        auth_key=Path(args.auth_key),
        share=args.share,
        device=args.device,
        sets=parse_assignments(args.set),
    )
    if args.state_dir:
        config[keys.STATE_DIR] = str(Path(args.state_dir).expanduser().resolve())
    root = None if args.insecure else Path(args.root_cert).resolve()
    with client.worker_dir(not args.no_worker, args.dry_run) as worker:
        if worker is not None:
            config[keys.WORKER] = str(channel.socket_path(worker))
        key, port = Path(args.auth_key).resolve(), args.port or client.free_port()
        cmd = client.supernode_command(args.superlink, root, key, config, port, args.max_retries)
        if args.dry_run:
            if worker is not None:
                print(procs_show(client.worker_command(worker)) + " &")
            print(procs_show(cmd))
            return
        client.join(cmd, worker)


def procs_show(cmd: list[str]) -> str:
    """A command as one shell line, with the environment fedtune sets."""
    from fedtune.deploy import procs

    return procs.exported() + " " + procs.show(cmd)


def _privacy(args: argparse.Namespace) -> None:
    from fedtune.privacy.accounting import GaussianEvent, epsilon, noise_multiplier

    for flag, ok in (
        ("--sample-rate", 0 < args.sample_rate <= 1),
        ("--steps", args.steps >= 1),
        ("--delta", 0 < args.delta < 1),
        ("--noise-multiplier", getattr(args, "noise_multiplier", 1.0) >= 0),
        ("--target-epsilon", getattr(args, "target_epsilon", 1.0) > 0),
    ):
        if not ok:
            raise FedtuneError(f"`{flag}` is out of range (sample rate in (0, 1], steps >= 1, delta in (0, 1)).")
    name = f"{args.accountant.upper()} accountant (Opacus)"
    if args.what == "epsilon":
        event = GaussianEvent(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate, steps=args.steps)
        value = epsilon([event], args.delta, args.accountant)
        print(f"epsilon, {name}: {args.steps} steps, noise multiplier {args.noise_multiplier},")
    else:
        value = noise_multiplier(args.target_epsilon, args.sample_rate, args.steps, args.delta, args.accountant)
        print(f"noise multiplier for epsilon <= {args.target_epsilon}, {name}: {args.steps} steps,")
    print(f"Poisson sample rate {args.sample_rate}, delta {args.delta}:")
    print(value)


def _fetch_model(args: argparse.Namespace) -> None:
    from fedtune.model.sources import fetch_smollm2

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

    keys = sub.add_parser("keys", help="create a CA, the server's TLS certificate and one auth key pair per site")
    keys.add_argument("--out", required=True, help="directory to create (must be new or empty)")
    keys.add_argument("--nodes", type=int, required=True, help="number of sites")
    keys.add_argument("--hosts", default="localhost,127.0.0.1", help="server names/IPs for the certificate")
    keys.set_defaults(func=_keys)

    srv = sub.add_parser("server", help="run the aggregation server: flower-superlink (TLS + node auth) and the run")
    srv.add_argument("--keys", required=True, help="directory written by `fedtune keys`")
    srv.add_argument("--address", default="127.0.0.1:8000", help="HOST:PORT the SuperLink listens on")
    srv.add_argument("--preset", choices=["tiny", "smollm2"], help="starting config, as for simulate")
    srv.add_argument("--out", help="run directory (default runs/<timestamp>)")
    srv.add_argument("--rounds", type=int, help="num-server-rounds")
    srv.add_argument("--seed", type=int, help="seed for everything")
    srv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key (repeatable)")
    srv.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last complete checkpoint")
    srv.add_argument("--dry-run", action="store_true", help="print the Flower commands instead of running them")
    srv.set_defaults(func=_server)

    cli = sub.add_parser("client", help="join a federation from a data site: flower-supernode with TLS and its key")
    cli.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    cli.add_argument("--root-cert", help="CA certificate (ca.pem from `fedtune keys`)")
    cli.add_argument("--auth-key", required=True, help="this site's private key (nodes/node-K.key)")
    cli.add_argument("--data", help="this site's data file (JSONL/CSV/Parquet); it never leaves the site")
    cli.add_argument("--preset", choices=["tiny", "smollm2"], help="use the built-in demo share for this node")
    cli.add_argument("--share", help="K/N: which demo share (default: K from node-K.key)")
    cli.add_argument("--device", choices=["cpu", "cuda"], help="where this site trains")
    cli.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a site setting, e.g. train.batch-size=8"
    )
    cli.add_argument(
        "--state-dir",
        help="where this site keeps its DP-SGD privacy ledger across restarts (default ~/.cache/fedtune/site-state)",
    )
    cli.add_argument("--port", type=int, help="local port of the SuperNode's runtime API (default: a free one)")
    cli.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    cli.add_argument("--insecure", action="store_true", help="no TLS (development only)")
    cli.add_argument(
        "--no-worker",
        action="store_true",
        help="no resident site worker: Flower's per-message ClientApp process loads torch and the model each time",
    )
    cli.add_argument("--dry-run", action="store_true", help="print the flower-supernode command instead of running it")
    cli.set_defaults(func=_client)

    priv = sub.add_parser("privacy", help="privacy calculators (the number alone is the last line)")
    priv_sub = priv.add_subparsers(dest="what", required=True)
    for what, help_text in (
        ("epsilon", "epsilon of a DP-SGD / DP-FedAvg schedule"),
        ("noise", "noise multiplier for a target epsilon"),
    ):
        calc = priv_sub.add_parser(what, help=help_text)
        if what == "epsilon":
            calc.add_argument("--noise-multiplier", type=float, required=True, help="sigma (noise std / clip norm)")
        else:
            calc.add_argument("--target-epsilon", type=float, required=True, help="the epsilon to stay within")
        calc.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
        calc.add_argument("--steps", type=int, required=True, help="number of steps (or rounds)")
        calc.add_argument("--delta", type=float, required=True, help="delta")
        calc.add_argument("--accountant", choices=["rdp", "prv"], default="rdp", help="Opacus accountant")
        calc.set_defaults(func=_privacy)

    fetch = sub.add_parser("fetch-model", help="cache the demo model locally (dequantized once)")
    fetch.add_argument("name", choices=["smollm2"])
    fetch.set_defaults(func=_fetch_model)
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line and exit status 1 for bad input, never a traceback wall."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    setup_logging()
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the Flower processes fedtune started are stopped too.
    signal.signal(signal.SIGTERM, _terminate)
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
