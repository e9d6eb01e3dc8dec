"""Per-round checkpoints written atomically (temp dir, then rename), and reading them back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedtune.config.plan import Plan
from fedtune.core.arrays import Arrays
from fedtune.core.atomic import write_atomic_dir
from fedtune.core.errors import FedtuneError
from fedtune.privacy import rounds as privacy
from fedtune.privacy.central import noise_rng
from fedtune.privacy.rounds import PrivacyState
from fedtune.server.outputs import read_checkpoint
from fedtune.server.record import RoundRecord
from fedtune.server.state import ServerState

STATE_FILE = "state.json"
OPTIMIZER_FILE = "server_optimizer.safetensors"
SEP = "::"  # optimizer name :: buffer key


def round_dir(out: Path, rnd: int) -> Path:
    """``OUT/checkpoints/round-NNN``."""
    return out / "checkpoints" / f"round-{rnd:03d}"


def save(out: Path, state: ServerState, plan: Plan, write_weights: Callable[[Path, Arrays], None]) -> Path:
    """Checkpoint the global state (``write_weights(dir, arrays)``: a vanilla PEFT folder, or the
    trainable weights for bitfit / full), round, RNGs, optimizer state, node ranks, the privacy
    ledger, the plan and the metrics history: everything the next round depends on.

    When a round claims amplification by client sampling, the sampling RNG is left out (its state
    would tell a reader who is sampled next; a resumed run reseeds it), and unless
    ``output.log-participants`` asks for them so are the node ranks, learned from who replied.
    """

    def fill(tmp: Path) -> None:
        write_weights(tmp, state.global_arrays)
        meta: dict[str, Any] = {"round": state.round}
        if not privacy.secret_sample(plan):
            meta["rng"] = state.rng.bit_generator.state
        meta["config"] = plan.to_flat()
        if not privacy.participants_hidden(plan):
            meta["node_ranks"] = {str(k): v for k, v in state.node_ranks.items()}
        history = [record.to_json() for record in state.history]
        meta.update(run_id=state.run_id, privacy=state.privacy.to_dict(), history=history)
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=str))
        flat = {f"{name}{SEP}{k}": v for name, arrays in state.optimizer_states.items() for k, v in arrays.items()}
        if flat:
            save_file(flat, str(tmp / OPTIMIZER_FILE))

    target = round_dir(out, state.round)
    write_atomic_dir(target, fill)
    return target


def load(directory: Path) -> ServerState:
    """Restore the ServerState a checkpoint directory holds."""
    meta = json.loads((directory / STATE_FILE).read_text())
    rng = noise_rng()  # no sampler saved (the sample is secret): reseed from OS entropy
    if "rng" in meta:
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng"]
    arrays = read_checkpoint(directory)
    optimizer_states: dict[str, dict[str, np.ndarray]] = {}
    if (directory / OPTIMIZER_FILE).is_file():
        for flat, value in load_file(str(directory / OPTIMIZER_FILE)).items():
            name, _, key = flat.partition(SEP)
            optimizer_states.setdefault(name, {})[key] = value
    return ServerState(
        round=int(meta["round"]),
        global_arrays=arrays,
        rng=rng,
        history=[RoundRecord.from_json(entry) for entry in meta["history"]],
        optimizer_states=optimizer_states,
        node_ranks={int(k): int(v) for k, v in meta.get("node_ranks", {}).items()},
        run_id=str(meta.get("run_id", "")),
        privacy=PrivacyState.from_dict(meta.get("privacy", {})),
    )


def latest(out: Path) -> Path:
    """The last complete checkpoint under ``OUT/checkpoints`` (temp dirs are never complete)."""
    done = sorted(p for p in (out / "checkpoints").glob("round-[0-9][0-9][0-9]") if (p / STATE_FILE).is_file())
    if not done:
        raise FedtuneError(f"{out}: no complete checkpoint under {out / 'checkpoints'} to resume from.")
    return done[-1]


def saved_plan(out: Path) -> dict[str, Any]:
    """The flat config (plan included) the run in ``out`` was started with."""
    config: dict[str, Any] = json.loads((latest(out) / STATE_FILE).read_text())["config"]
    return config
