"""A site's own adapter entries (FedSA-LoRA's B) kept across rounds and restarts.

They live in the ClientApp's ``context.state`` (kept by the SuperNode between messages of a run) and
in a safetensors file under the site's state directory (node config ``state-dir``), written atomically
after each round, so a restarted site continues with its own B. Both are keyed by the run's id.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import Context
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedtune.core.arrays import Arrays
from fedtune.core.errors import ConfigError
from fedtune.core.paths import fedtune_home
from fedtune.privacy.site import state_file
from fedtune.wire import keys
from fedtune.wire.records import arrays_from_record, record_from_arrays

STATE_KEY = "fedtune.personal"


def state_path(context: Context, run_id: str, site_name: str) -> Path:
    """``STATE_DIR/<run id>-<site hash>.personal.safetensors`` (beside the site's DP-SGD ledger)."""
    state_dir = Path(str(context.node_config.get(keys.STATE_DIR) or fedtune_home() / "site-state")).expanduser()
    return state_file(state_dir, run_id, site_name).with_suffix(".personal.safetensors")


def _record_name(run_id: str) -> str:
    return f"{STATE_KEY}.{run_id}"


def restore(context: Context, run_id: str, site_name: str) -> Arrays | None:
    """The site's own entries from ``context.state``, else from its file; None before its first round."""
    record = context.state.array_records.get(_record_name(run_id))
    if record is not None:
        return arrays_from_record(record)
    path = state_path(context, run_id, site_name)
    if not path.is_file():
        return None
    try:
        own: Arrays = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{site_name}: cannot read its own adapter part {path}: {exc}") from None
    context.state.array_records[_record_name(run_id)] = record_from_arrays(own)
    return own


def keep(own: Arrays, context: Context, run_id: str, site_name: str) -> None:
    """Write the site's own entries to ``context.state`` and, atomically, to its file."""
    own = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in own.items()}
    context.state.array_records[_record_name(run_id)] = record_from_arrays(own)
    path = state_path(context, run_id, site_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(own, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
