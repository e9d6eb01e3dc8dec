"""A site's own adapter entries (FedSA-LoRA's B) kept across rounds and restarts.

They live in the ClientApp's ``context.state`` (kept by the SuperNode between messages of a run) and
in safetensors files under the site's state directory (node config ``state-dir``), written atomically
after each round, so a restarted site continues with its own B. Both are keyed by the run's id and
tagged with the round that trained them, and the site's last ``KEEP`` rounds are kept: a server that resumes
from its last complete checkpoint replays the round in flight, and the site then starts it from the B
of the round before, as an uninterrupted run does.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from flwr.app import Context
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedtune.core.arrays import Arrays
from fedtune.core.atomic import write_atomic_file
from fedtune.core.errors import ConfigError
from fedtune.core.paths import fedtune_home
from fedtune.privacy.site import state_file
from fedtune.wire import keys
from fedtune.wire.records import arrays_from_record, record_from_arrays

STATE_KEY = "fedtune.personal"
KEEP = 2  # rounds of B kept: the latest, and the one a replayed (resumed) round starts from


def state_dir(context: Context) -> Path:
    return Path(str(context.node_config.get(keys.STATE_DIR) or fedtune_home() / "site-state")).expanduser()


def state_path(context: Context, run_id: str, site_name: str, rnd: int) -> Path:
    """``STATE_DIR/<run id>-<site hash>.personal-r<round>.safetensors`` (beside the DP-SGD ledger)."""
    return state_file(state_dir(context), run_id, site_name).with_suffix(f".personal-r{rnd}.safetensors")


def _kept(context: Context, run_id: str, site_name: str) -> dict[int, Path]:
    """The site's files by round."""
    stem = state_file(state_dir(context), run_id, site_name).with_suffix("").name
    pattern = re.compile(re.escape(stem) + r"\.personal-r(\d+)\.safetensors")
    where = state_dir(context)
    found = (pattern.fullmatch(p.name) for p in where.iterdir()) if where.is_dir() else iter(())
    return {int(m.group(1)): where / m.group(0) for m in found if m}


def _record_names(context: Context, run_id: str) -> dict[int, str]:
    prefix = f"{STATE_KEY}.{run_id}.r"
    return {int(n[len(prefix) :]): n for n in context.state.array_records if n.startswith(prefix)}


def restore(context: Context, run_id: str, site_name: str, upto: int) -> Arrays | None:
    """The site's own entries of the latest round <= ``upto``, from ``context.state``, else from its
    file; None before its first round."""
    held = {r: n for r, n in _record_names(context, run_id).items() if r <= upto}
    if held:
        return arrays_from_record(context.state.array_records[held[max(held)]])
    files = {r: p for r, p in _kept(context, run_id, site_name).items() if r <= upto}
    if not files:
        return None
    path = files[max(files)]
    try:
        own: Arrays = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{site_name}: cannot read its own adapter part {path}: {exc}") from None
    context.state.array_records[f"{STATE_KEY}.{run_id}.r{max(files)}"] = record_from_arrays(own)
    return own


def keep(own: Arrays, context: Context, run_id: str, site_name: str, rnd: int) -> None:
    """Write round ``rnd``'s own entries to ``context.state`` and, atomically, to their file; drop all
    but the site's last ``KEEP`` rounds."""
    own = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in own.items()}
    context.state.array_records[f"{STATE_KEY}.{run_id}.r{rnd}"] = record_from_arrays(own)
    write_atomic_file(state_path(context, run_id, site_name, rnd), lambda tmp: save_file(own, str(tmp)))
    # by count, not by round: a site sampled in rounds 2 and 7 replays round 7 from round 2's B
    names = _record_names(context, run_id)
    for old in sorted(names)[:-KEEP]:
        del context.state.array_records[names[old]]
    files = _kept(context, run_id, site_name)
    for old in sorted(files)[:-KEEP]:
        files[old].unlink(missing_ok=True)
