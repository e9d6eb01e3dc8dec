"""``fedtune keys``, ``fedtune server`` and ``fedtune client``: a real federation across machines."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtune.cli.run import add_run_options, plan_from_args
from fedtune.config import Scalar, parse_assignments
from fedtune.config.presets import PRESET_SITES, PRESETS
from fedtune.core.errors import FedtuneError
from fedtune.deploy.supernode import DEFAULT_INTERVAL as DEFAULT_POLL_INTERVAL
from fedtune.deploy.supernode import parse_interval


def add_keys(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedtune keys``: the CA, the server's certificate and one auth key pair per site."""
    keys = sub.add_parser("keys", help="create a CA, the server's TLS certificate and one auth key pair per site")
    keys.add_argument("--out", required=True, help="directory to create (must be new or empty)")
    keys.add_argument("--nodes", type=int, required=True, help="number of sites")
    keys.add_argument(
        "--hosts", default="localhost,127.0.0.1", help="server names/IPs for the certificate (default: %(default)s)"
    )
    keys.set_defaults(func=_keys)


def add_server(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedtune server``: flower-superlink and the run."""
    srv = sub.add_parser("server", help="run the aggregation server: flower-superlink (TLS + node auth) and the run")
    srv.add_argument("--keys", help="directory written by `fedtune keys` (required; on --resume: the run's own)")
    srv.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="HOST:PORT the SuperLink listens on (default: 127.0.0.1:8000; on --resume: the address the run used)",
    )
    add_run_options(srv, "starting config, as for simulate", clients=False)
    srv.add_argument("--dry-run", action="store_true", help="print the Flower commands instead of running them")
    srv.set_defaults(func=_server)


def add_client(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedtune client``: flower-supernode for one data site."""
    cli = sub.add_parser("client", help="join a federation from a data site: flower-supernode with TLS and its key")
    cli.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    cli.add_argument("--root-cert", help="CA certificate (ca.pem from `fedtune keys`)")
    cli.add_argument("--auth-key", required=True, help="this site's private key (nodes/node-K.key)")
    cli.add_argument("--data", help="this site's data file (JSONL/CSV/Parquet); it never leaves the site")
    cli.add_argument("--preset", choices=list(PRESETS), help="use the built-in demo share for this node")
    cli.add_argument(
        "--share",
        help="K/N: which demo share (default: K from node-K.key; N the preset's site count: "
        + ", ".join(f"{name} {n}" for name, n in PRESET_SITES.items())
        + ")",
    )
    cli.add_argument("--device", choices=["cpu", "cuda"], help="where this site trains")
    cli.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a site setting, e.g. train.batch-size=8"
    )
    cli.add_argument(
        "--state-dir",
        help="where this site keeps its DP-SGD privacy ledger and its own B (`lora.share = a`) across restarts "
        "(default ~/.cache/fedtune/site-state)",
    )
    cli.add_argument(
        "--out",
        help="where this site writes its personal adapter (`lora.share = a`, `personalize.local-steps`); "
        "it never leaves the site",
    )
    cli.add_argument("--port", type=int, help="local port of the SuperNode's runtime API (default: a free one)")
    cli.add_argument(
        "--max-retries",
        type=int,
        help="give up after this many failed connection attempts (default: retry forever, as flower-supernode)",
    )
    cli.add_argument(
        "--register-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="while the SuperLink refuses this site's key as unregistered, retry for this long (default: %(default)s)",
    )
    cli.add_argument(
        "--poll-interval",
        default=DEFAULT_POLL_INTERVAL,
        metavar="SECONDS",
        help="pause between this site's pulls from the SuperLink while no message waits (Flower's SuperNode: "
        "3 s, which delays every message by up to that; default: %(default)s)",
    )
    cli.add_argument("--insecure", action="store_true", help="no TLS (development only)")
    cli.add_argument(
        "--no-worker",
        action="store_true",
        help="no resident site worker: Flower's per-message ClientApp process loads torch and the model each time",
    )
    cli.add_argument("--dry-run", action="store_true", help="print the flower-supernode command instead of running it")
    cli.set_defaults(func=_client)


def _keys(args: argparse.Namespace) -> None:
    from fedtune.deploy.keys import make_keys

    layout = make_keys(Path(args.out), args.nodes, args.hosts.split(","))
    print(f"Wrote {layout.ca}, {layout.server_cert}, {layout.server_key}")
    print(f"and {args.nodes} SuperNode key pair(s) in {layout.root / 'nodes'} (private keys: mode 0600)")


def _server(args: argparse.Namespace) -> None:
    from fedtune.deploy.keys import KeyLayout
    from fedtune.deploy.server import serve, settings

    plan = plan_from_args(args)
    address, keys = settings(Path(plan.base.output.dir), args.address, args.keys, bool(args.resume))
    out = serve(plan, KeyLayout(Path(keys)), address, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"Run finished: {out}")


def _client(args: argparse.Namespace) -> None:
    from fedtune.client import channel
    from fedtune.deploy import client
    from fedtune.wire import keys

    for flag, path in (("--root-cert", args.root_cert), ("--auth-key", args.auth_key)):
        if path is not None and not Path(path).is_file():
            raise FedtuneError(f"`{flag}`: no such file: {path}")
    try:  # the same check as the SuperNode module's own, before anything starts
        poll_interval = parse_interval(str(args.poll_interval))
    except ValueError as exc:
        raise FedtuneError(str(exc)) from None
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
    _announce_local_sites(args.superlink, config)
    if args.state_dir:
        config[keys.STATE_DIR] = str(Path(args.state_dir).expanduser().resolve())
    if args.out:
        config[keys.SITE_OUT] = str(Path(args.out).expanduser().resolve())
    root = None if args.insecure else Path(args.root_cert).resolve()
    with client.worker_dir(not args.no_worker, args.dry_run) as worker:
        if worker is not None:
            config[keys.WORKER] = str(channel.socket_path(worker))
        key, port = Path(args.auth_key).resolve(), args.port or client.free_port()
        cmd = client.supernode_command(args.superlink, root, key, config, port, args.max_retries, poll_interval)
        if args.dry_run:
            if worker is not None:
                print(procs_show(client.worker_command(worker)) + " &")
            print(procs_show(cmd))
            return
        client.join(cmd, worker, register_wait=args.register_wait)


def _announce_local_sites(superlink: str, config: dict[str, Scalar]) -> None:
    """A demo share of N sites on a loopback SuperLink is a test federation on this machine: its N
    site workers share the cores (``train.num-threads`` = 0 divides them, fedtune.model.threads)."""
    import ipaddress

    from fedtune.model import threads
    from fedtune.wire import keys

    host = superlink.rpartition(":")[0].strip("[]")
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if local and keys.NUM_PARTITIONS in config:
        threads.announce(int(config[keys.NUM_PARTITIONS]))


def procs_show(cmd: list[str]) -> str:
    """A command as one shell line, with the environment fedtune sets."""
    import os

    from fedtune.deploy import procs
    from fedtune.model.threads import PROCESSES_ENV

    announced = f" {PROCESSES_ENV}={os.environ[PROCESSES_ENV]}" if PROCESSES_ENV in os.environ else ""
    return procs.exported() + announced + " " + procs.show(cmd)
