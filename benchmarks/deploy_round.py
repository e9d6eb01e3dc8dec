"""Deployed round time with and without the site worker, and where a round's time goes (issue 3).

Runs the same federation twice, one variant after the other in one invocation: ``fedtune keys``,
``fedtune server`` and N x ``fedtune client`` on 127.0.0.1 with TLS and SuperNode authentication,
once with ``--no-worker`` (Flower's fresh ClientApp process loads torch and the model for every
message: the baseline) and once with the resident site worker (the default). Every output line of
every process is stamped on arrival, so the SuperNodes' "Receiving"/"Sending" lines give the time a
message spent at a site, and the worker's lines give its handler time. The per-stage costs that
both variants share (model load, train, serialize, aggregate, eval) are timed in this process on
the same preset. Prints markdown for BENCHMARKS.md.

    .venv/bin/python benchmarks/deploy_round.py --preset tiny --sites 3 --rounds 2
    .venv/bin/python benchmarks/deploy_round.py --preset smollm2 --sites 2 --rounds 2 --set train.local-steps=1

With ``--against ray`` (issue 17's goal) it runs the deployed federation (site workers, TLS, node auth, one torch
thread per site) and then the same federation simulated on Flower's Ray engine with one CPU per client
(``fedtune simulate``, same preset, sites, rounds, steps and evaluation: federated and central evaluation on
unless ``--set`` says otherwise), in the same invocation, and prints the per-round ratio and the deployed per-stage
table (pull, SuperExec and process start, handler, push, server work).

    .venv/bin/python benchmarks/deploy_round.py --against ray --preset smollm2 --sites 2 --rounds 3 \
        --poll-intervals 3,0.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# One torch thread per process: the server and the sites share this machine's cores (see
# tests/integration/test_deploy.py); both variants run with the same environment.
ENV = {
    **os.environ,
    "FLWR_TELEMETRY_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}
CLI = [sys.executable, "-m", "fedtune.cli"]


class Stamped:
    """A process whose output lines are kept with the time they arrived."""

    def __init__(self, cmd: list[str], t0: float) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, start_new_session=True, text=True
        )
        self.reader = threading.Thread(target=self._read, args=(t0,), daemon=True)
        self.reader.start()

    def _read(self, t0: float) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - t0, line.rstrip()))

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        self.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_variant(
    keys: Path, out: Path, args: argparse.Namespace, worker: bool, evaluate: bool = False, poll: str | None = None
) -> dict[str, Any]:
    """One deployed federation; returns round seconds and per-message site timings. ``evaluate``: keep the
    preset's federated evaluation (off otherwise: train messages only, as the issue-3 figures were taken) and split
    the demo data into ``--sites`` shares, as ``fedtune simulate --clients`` does."""
    t0 = time.monotonic()
    address, run = f"127.0.0.1:{free_port()}", out / "run"
    sets = [f"server.min-clients={args.sites}", *([] if evaluate else ["eval.federated=false"]), *args.set]
    cmd = [*CLI, "server", "--keys", str(keys), "--preset", args.preset, "--out", str(run), "--address", address]
    cmd += ["--rounds", str(args.rounds), *[x for s in sets for x in ("--set", s)]]
    server = Stamped(cmd, t0)
    clients: list[Stamped] = []
    try:
        while not any("sites can join now" in line for _, line in server.lines):
            if server.proc.poll() is not None:
                raise SystemExit("\n".join(line for _, line in server.lines[-20:]))
            time.sleep(0.2)
        for k in range(1, args.sites + 1):
            cmd = [*CLI, "client", "--superlink", address, "--root-cert", str(keys / "ca.pem")]
            cmd += ["--auth-key", str(keys / "nodes" / f"node-{k}.key"), "--preset", args.preset]
            if evaluate:  # the data split as `fedtune simulate --clients N` splits it
                cmd += ["--share", f"{k}/{args.sites}"]
            cmd += [] if poll is None else ["--poll-interval", poll]
            clients.append(Stamped(cmd + ([] if worker else ["--no-worker"]), t0))
        if server.proc.wait(timeout=3600) != 0:
            raise SystemExit("\n".join(line for _, line in server.lines[-30:]))
    finally:
        for proc in [*clients, server]:
            proc.stop()
        for name, proc in [("server", server), *((f"client-{i + 1}", c) for i, c in enumerate(clients))]:
            (out / f"{name}.log").write_text("".join(f"{t:8.2f} {line}\n" for t, line in proc.lines))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if failed := [(r["round"], r["failures"]) for r in rows if r.get("failures")]:
        raise SystemExit(f"deployed rounds had failures, no figure: {failed[0]}")
    return {"rows": rows, "sites": [site_timings(c.lines) for c in clients]}


def run_ray(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same federation on Flower's Ray engine, one CPU and one torch thread per client."""
    sets = [f"server.min-clients={args.sites}", "simulation.backend=ray", "simulation.num-cpus=1", *args.set]
    cmd = [*CLI, "simulate", "--preset", args.preset, "--out", str(out / "run"), "--rounds", str(args.rounds)]
    cmd += ["--clients", str(args.sites), *[x for s in sets for x in ("--set", s)]]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    (out / "simulate.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "simulate.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "wall": time.monotonic() - start}


def against_ray(args: argparse.Namespace, root: Path, keys: Path) -> None:
    """Issue 17's comparison: deployed (site workers) against Ray, same invocation, and where the time goes.
    One deployed federation per ``--poll-intervals`` value (the SuperNode's pause between idle pulls)."""
    # The demo data split into --sites iid shares (the preset's natural split needs its own 5 sites).
    iid = [] if any(s.startswith("data.partitioner=") for s in args.set) else ["data.partitioner=iid"]
    args.set = ["train.num-threads=1", *iid, *args.set]
    polls = args.poll_intervals.split(",")
    deployed = {
        p: run_variant(keys, root / f"deployed-poll-{p}", args, worker=True, evaluate=True, poll=p) for p in polls
    }
    ray = run_ray(root / "ray", args)
    print(f"\n{args.preset}, {args.sites} sites, {args.rounds} rounds, sets {args.set}\n")
    names = [f"deployed, poll {p} s" for p in polls]
    print(
        "| round | "
        + " | ".join(f"{n} (s)" for n in names)
        + " | Ray simulation (s) | "
        + " | ".join(f"{n} / Ray" for n in names)
        + " |"
    )
    print("|---|" + "---|" * (2 * len(polls) + 1))
    for rnd, r in enumerate(ray["rows"][1:], start=1):
        ds = [deployed[p]["rows"][rnd]["seconds"] for p in polls]
        cells = [f"{d:.1f}" for d in ds] + [f"{r['seconds']:.1f}"] + [f"{d / r['seconds']:.2f}" for d in ds]
        print(f"| {rnd} | " + " | ".join(cells) + " |")
    later_r = sum(r["seconds"] for r in ray["rows"][2:])
    for p, name in zip(polls, names, strict=True):
        if later_r:
            later_d = sum(d["seconds"] for d in deployed[p]["rows"][2:])
            print(f"\nrounds 2-{args.rounds}: {name} / Ray = {later_d / later_r:.2f}")
        print(f"losses: {name}: {[round(r['eval_loss'], 4) for r in deployed[p]['rows']]}")
    print(f"losses: Ray: {[round(r['eval_loss'], 4) for r in ray['rows']]}")
    for p, name in zip(polls, names, strict=True):
        print(f"\n{name}\n")
        print(
            "| round | message | site | pull (s) | SuperExec + process + handler (s) | worker handler (s) | push (s) |"
        )
        print("|---|---|---|---|---|---|---|")
        for rnd in range(0, args.rounds + 1):
            for kind in ("train", "evaluate"):
                for k, site in enumerate(deployed[p]["sites"], start=1):
                    if (t := site.get((rnd, kind))) is None:
                        continue
                    cells = [f"{t[key]:.2f}" if key in t else "-" for key in ("pull", "clientapp", "handler", "push")]
                    print(f"| {rnd} | {kind} | {k} | " + " | ".join(cells) + " |")
        print("\n| round | server time stages (metrics.jsonl `time`, s) |\n|---|---|")
        for d in deployed[p]["rows"][1:]:
            print(f"| {d['round']} | " + ", ".join(f"{k} {v:.2f}" for k, v in d.get("time", {}).items()) + " |")
    print("\nRay simulation\n\n| round | server time stages (metrics.jsonl `time`, s) |\n|---|---|")
    for r in ray["rows"][1:]:
        print(f"| {r['round']} | " + ", ".join(f"{k} {v:.2f}" for k, v in r.get("time", {}).items()) + " |")


def site_timings(lines: list[tuple[float, str]]) -> dict[tuple[int, str], dict[str, float]]:
    """Per (round, message kind: train / evaluate), from the SuperNode's lines: pulling the message
    from the SuperLink ("Receiving" to "Received successfully"), the ClientApp ("Received" to
    "Sending": SuperExec's poll, the process, the handler) and pushing the reply ("Sending" to "Sent
    successfully"); and the worker's handler/decode/encode seconds (worker variant only)."""
    out: dict[tuple[int, str], dict[str, float]] = {}
    current: dict[str, float] = {}
    rnd, mark, sending = 0, 0.0, False
    for t, line in lines:
        if m := re.search(r"ROUND (\d+)\]", line):
            rnd = int(m.group(1))
        elif m := re.search(r"Receiving: (\w+) message", line):
            current, mark = out.setdefault((rnd, m.group(1)), {}), t
        elif "Received successfully" in line:
            current["pull"], mark = t - mark, t
        elif re.search(r"Sending: \w+ message", line):
            current["clientapp"], mark, sending = t - mark, t, True
        elif "Sent successfully" in line and sending:
            current["push"], sending = t - mark, False
        elif m := re.search(r"site worker: \w+ \(round \d+\) in ([\d.]+) s: decode ([\d.]+) s, handler ([\d.]+) s, "
                            r"encode ([\d.]+) s", line):  # fmt: skip
            current.update(worker=float(m.group(1)), decode=float(m.group(2)), handler=float(m.group(3)))
            current["encode"] = float(m.group(4))
    return out


def import_seconds(module: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter importing ``module`` (process start included)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], env=ENV, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_seconds(preset_name: str, sets: list[str], sites: int) -> dict[str, float]:
    """Model load + data, train, serialize, aggregate and eval, timed in this process."""
    from flwr.app import Context, Message, MessageType, RecordDict

    from fedtune.client import channel
    from fedtune.client.site import open_site
    from fedtune.config import parse_assignments
    from fedtune.config.plan import Plan
    from fedtune.config.presets import preset
    from fedtune.model.adapters import adapter_arrays, init_adapter, wrap_lora
    from fedtune.model.loading import load_base, pick_device
    from fedtune.model.tiny import build_tiny_model
    from fedtune.server.evaluation import CentralEvaluator
    from fedtune.server.send import round_content
    from fedtune.simulations.local import _set_task_identity
    from fedtune.strategies import make_aggregator
    from fedtune.wire import keys
    from fedtune.wire.records import read_arrays

    flat = {**preset(preset_name), **parse_assignments(sets)}
    if preset_name == "tiny":
        flat["model.name"] = str(build_tiny_model(Path(tempfile.mkdtemp()) / "base-model"))
    cfg = Plan.from_flat(flat).base
    node = {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: {"tiny": 3, "smollm2": 5}[preset_name]}
    out: dict[str, float] = {}
    start = time.perf_counter()
    open_site(cfg, node)  # what a fresh ClientApp process does first: load the base model, tokenize
    out["model load + site data"] = time.perf_counter() - start
    loaded = load_base(cfg.model, pick_device("auto"))
    model = wrap_lora(loaded, cfg.lora)
    init_adapter(model, cfg.seed)
    arrays = adapter_arrays(model)
    _set_task_identity()
    from fedtune.client.app import app

    msg = Message(round_content(arrays, cfg, 1), dst_node_id=1, message_type=MessageType.TRAIN, group_id="1")
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    app(msg, context)  # warm-up (the adapter slot)
    start = time.perf_counter()
    reply = app(msg, context)
    out["train (handler)"] = time.perf_counter() - start
    start = time.perf_counter()
    for item in ((msg, context), (reply, context)):
        channel.unpack(channel.pack(*item))
    out["serialize + parse (message and reply)"] = time.perf_counter() - start
    delta = read_arrays(reply.content, keys.DELTA)
    start = time.perf_counter()
    aggregator = make_aggregator(cfg.strategy, arrays)
    for _ in range(sites):
        aggregator.add(delta, 1.0)
    aggregator.result()
    out[f"aggregate ({sites} deltas)"] = time.perf_counter() - start
    evaluator = CentralEvaluator(cfg, loaded)
    start = time.perf_counter()
    evaluator(arrays)
    out["centralized eval"] = time.perf_counter() - start
    return out


def setup(description: str, prefix: str) -> tuple[argparse.Namespace, Path, Path]:
    """The deployed benchmarks' shared options, a fresh log directory and the run's keys."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="server config (KEY=VALUE, repeatable)")
    parser.add_argument("--against", choices=["no-worker", "ray"], default="no-worker")
    parser.add_argument(
        "--poll-intervals",
        default="0.5",
        help="with --against ray: one deployed federation per comma-separated `fedtune client --poll-interval`",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"logs in {root}")
    keys = root / "keys"
    subprocess.run([*CLI, "keys", "--out", str(keys), "--nodes", str(args.sites)], env=ENV, check=True)
    return args, root, keys


def main() -> None:
    args, root, keys = setup(__doc__.splitlines()[0], "fedtune-bench-")
    if args.against == "ray":
        against_ray(args, root, keys)
        return
    results = {}
    for name, worker in (("no worker (baseline)", False), ("site worker", True)):
        results[name] = run_variant(keys, root / name.split()[0], args, worker)
    imports = {
        "flwr-clientapp's own imports": import_seconds("flwr.supernode.runtime.run_clientapp"),
        "ClientApp with torch (fedtune.client.app)": import_seconds("fedtune.client.app"),
        "ClientApp edge (fedtune.client.edge)": import_seconds("fedtune.client.edge"),
    }
    stages = stage_seconds(args.preset, args.set, args.sites)
    report(args, results, imports, stages)


def report(
    args: argparse.Namespace, results: dict[str, Any], imports: dict[str, float], stages: dict[str, float]
) -> None:
    print(f"\n{args.preset}, {args.sites} sites, {args.rounds} rounds, sets {args.set}\n")
    base = results["no worker (baseline)"]["rows"]
    print("| variant | " + " | ".join(f"round {r} (s)" for r in range(1, args.rounds + 1)) + " | ratio to baseline |")
    print("|---|" + "---|" * (args.rounds + 1))
    for name, result in results.items():
        rows = result["rows"][1:]
        ratio = " / ".join(f"{r['seconds'] / b['seconds']:.2f}" for r, b in zip(rows, base[1:], strict=True))
        print(f"| {name} | " + " | ".join(f"{r['seconds']:.1f}" for r in rows) + f" | {ratio} |")
    print(
        "\n| variant | round | pull message (s) | ClientApp: SuperExec poll + process + handler (s) "
        "| of which worker handler (s) | worker decode + encode (s) | push reply (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        for rnd in range(1, args.rounds + 1):
            per = [s.get((rnd, "train"), {}) for s in result["sites"]]

            def col(key: str, fmt: str = ".1f", per: list[dict[str, float]] = per) -> str:
                return ", ".join(f"{p[key]:{fmt}}" for p in per if key in p) or "-"

            codec = ", ".join(f"{p['decode'] + p['encode']:.3f}" for p in per if "decode" in p) or "-"
            cells = [col("pull"), col("clientapp"), col("handler", ".2f"), codec, col("push")]
            print(f"| {name} | {rnd} | " + " | ".join(cells) + " |")
    print("\n| stage | seconds |\n|---|---|")
    for name, value in {**imports, **stages}.items():
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
