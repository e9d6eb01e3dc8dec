"""``fedtune server``: a real ``flower-superlink`` with TLS and SuperNode authentication, the sites'
keys registered, and the fedtune run submitted with ``flwr run``; the SuperLink is always stopped.

fedtune writes the run as a Flower app (``OUT/app/pyproject.toml`` whose config is the run's flat
config) and a ``flwr`` connection (``OUT/.flwr/config.toml``); the commands it runs are exactly what
a Flower user would type, and ``--dry-run`` prints them.
"""

from __future__ import annotations

import logging
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fedtune.config import toml_scalar
from fedtune.config.baselines import parse_baselines
from fedtune.config.plan import Plan
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.data.loaders import load_eval_records
from fedtune.data.prompts import check_format
from fedtune.deploy import lifecycle, procs
from fedtune.deploy.keys import KeyLayout
from fedtune.model.sources import load_tokenizer, resolve_model
from fedtune.privacy import compat
from fedtune.server import tracking
from fedtune.server.report import SUMMARY_FILE

log = logging.getLogger(__name__)

CONNECTION = "fedtune"


@dataclass(frozen=True)
class ServerFiles:
    """Where ``fedtune server`` keeps its Flower plumbing inside the run directory."""

    out: Path

    @property
    def app(self) -> Path:
        return self.out / "app"

    @property
    def flwr_home(self) -> Path:
        return self.out / ".flwr"

    @property
    def database(self) -> Path:
        return self.out / "superlink.db"

    @property
    def superlink_log(self) -> Path:
        return self.out / "superlink.log"


def check_keys(layout: KeyLayout) -> list[Path]:
    """The TLS files must exist and parse; returns the sites' public keys (at least one)."""
    for path, kind in [(layout.ca, "cert"), (layout.server_cert, "cert"), (layout.server_key, "key")]:
        try:
            data = path.read_bytes()
            if kind == "cert":
                x509.load_pem_x509_certificate(data)
            else:
                load_pem_private_key(data, password=None)
        except OSError as exc:
            raise FedtuneError(
                f"`--keys`: cannot read {path}: {exc.strerror} (create keys with `fedtune keys`)."
            ) from None
        except ValueError:
            raise FedtuneError(f"`--keys`: {path} is not a valid PEM {kind}.") from None
    pubs = layout.node_pubs()
    if not pubs:
        raise FedtuneError(f"`--keys`: {layout.root / 'nodes'} holds no node-K.pub; nothing could join.")
    return pubs


def app_pyproject(plan: Plan) -> str:
    """A Flower app whose components are fedtune's and whose config is this run's flat config."""
    lines = [
        "# Written by `fedtune server`: fedtune's ServerApp/ClientApp with this run's config.",
        "[project]",
        'name = "fedtune-run"',
        'version = "1.0.0"',
        'description = "A fedtune run"',
        'license = "Apache-2.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "fedtune"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedtune.server.app:app"',
        'clientapp = "fedtune.client.edge:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {toml_scalar(value)}" for key, value in plan.to_flat().items()]
    return "\n".join(lines) + "\n"


def commands(files: ServerFiles, layout: KeyLayout, host: str, port: int) -> dict[str, list[str]]:
    """The Flower commands ``fedtune server`` runs, by step."""
    superlink = [
        procs.flower_bin("flower-superlink"),
        *("--ssl-ca-certfile", str(layout.ca), "--ssl-certfile", str(layout.server_cert)),
        *("--ssl-keyfile", str(layout.server_key), "--enable-supernode-auth"),
        *("--database", str(files.database), "--host", host, "--port", str(port)),
        "--disable-runtime-dependency-installation",
    ]
    register = [[procs.flower_bin("flwr"), "supernode", "register", str(p), CONNECTION] for p in layout.node_pubs()]
    run = [procs.flower_bin("flwr"), "run", str(files.app), CONNECTION, "--stream"]
    return {"superlink": superlink, **{f"register-{i + 1}": c for i, c in enumerate(register)}, "run": run}


def refuse_simulation_only(plan: Plan) -> None:
    """Settings only a simulation can carry out: ``baselines`` trains on every site's data."""
    if parse_baselines(plan.base.baselines):
        raise ConfigError(
            "`baselines` is for `fedtune simulate` only: the baselines train on every site's data, which a "
            "deployment server does not have."
        )


def precheck(plan: Plan) -> None:
    """What the server can check before anything starts: plan, model, prompt format, eval data."""
    compat.check(plan)
    cfg = plan.base
    tracking.chosen(cfg)  # a missing tracker package, before the SuperLink starts
    check_format(cfg.data, load_tokenizer(resolve_model(cfg.model)), cfg.model.name)
    if cfg.eval.centralized:
        load_eval_records(cfg.data)


DEFAULT_ADDRESS = "127.0.0.1:8000"


def settings(out: Path, address: str | None, keys: str | None, resume: bool) -> tuple[str, str]:
    """The SuperLink's address and the key directory: as given, else (on resume) as the run saved
    them, else the defaults."""
    saved = lifecycle.saved_settings(out) if resume else {}
    address = address or saved.get("address") or DEFAULT_ADDRESS
    keys = keys or saved.get("keys")
    if not keys:
        raise FedtuneError("`--keys` is required (the directory written by `fedtune keys`).")
    return address, keys


def serve(plan: Plan, layout: KeyLayout, address: str, *, dry_run: bool = False) -> Path:
    """Run the whole server side; returns the run directory."""
    refuse_simulation_only(plan)
    host, port = procs.split_address(address, "--address")
    files = ServerFiles(Path(plan.base.output.dir))
    cmds = commands(files, layout, host, port)
    if dry_run:
        print(f"export {procs.exported()} FLWR_HOME={files.flwr_home}")
        for cmd in cmds.values():
            print(procs.show(cmd))
        return files.out
    check_keys(layout)
    precheck(plan)
    lifecycle.check_leftover(files.out)
    if not procs.port_free(host, port):
        raise FedtuneError(f"`--address`: {host}:{port} is already in use.")
    lifecycle.save_settings(files.out, {"address": f"{host}:{port}", "keys": str(layout.root.resolve())})
    files.app.mkdir(parents=True, exist_ok=True)
    (files.app / "pyproject.toml").write_text(app_pyproject(plan))
    files.flwr_home.mkdir(parents=True, exist_ok=True)
    (files.flwr_home / "config.toml").write_text(
        f'[superlink.{CONNECTION}]\naddress = "{host}:{port}"\nroot-certificates = "{layout.ca.resolve()}"\n'
    )
    extra = {"FLWR_HOME": str(files.flwr_home)}
    with procs.running(cmds["superlink"], files.superlink_log, extra) as superlink:
        (files.out / lifecycle.PID_FILE).write_text(f"{superlink.pid}\n")  # its group: `kill -- -PID`
        procs.wait_for_port(superlink, "flower-superlink", host, port, files.superlink_log)
        log.info("SuperLink up on %s:%d (TLS, SuperNode authentication on); log: %s", host, port, files.superlink_log)
        registers = [cmd for name, cmd in cmds.items() if name.startswith("register-")]
        with ThreadPoolExecutor(max_workers=8) as pool:  # each `flwr` call spends seconds importing
            list(pool.map(lambda cmd: _register(cmd, extra), registers))
        # A site that connects before its key is registered is refused (Flower's 2004); `fedtune
        # client` retries for `--register-wait` seconds.
        log.info("%d site key(s) registered: sites can join now", len(registers))
        status, cause, _ = lifecycle.stream_run(cmds["run"], procs.env(extra), files.out)
    if not (files.out / SUMMARY_FILE).exists():
        log.warning(
            "The ServerApp's output is in %s, the SuperLink's in %s", files.out / lifecycle.RUN_LOG, files.superlink_log
        )
        raise FedtuneError(cause or f"the run did not finish (flwr run exited {status}).")
    return files.out


def _register(cmd: list[str], extra: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=procs.env(extra), capture_output=True, text=True, check=False)
    text = (proc.stdout + proc.stderr).strip()
    if "registered successfully" in text:
        log.info("Registered %s", Path(cmd[3]).name)
    elif "already in use" in text:
        log.info("%s was registered before", Path(cmd[3]).name)  # registrations persist in the database
    else:
        raise FedtuneError(f"registering {cmd[3]} failed: {text.splitlines()[-1] if text else proc.returncode}")
