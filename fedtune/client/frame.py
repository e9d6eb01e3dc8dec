"""A LoRA-SB site's copy of the frame (the fixed A and B), so that the server sends it only once.

Every LoRA-SB adapter from the server names the frame's fingerprint (``fedtune.model.sb.fingerprint``,
the index's ``frame`` entry). An adapter that carries the frame is checked against that fingerprint and
its frame kept in the ClientApp's ``context.state`` and, when the site has a state directory (node
config ``state-dir``, ``fedtune client --state-dir``), in ``sb-frame-<fingerprint>.safetensors`` there,
written atomically, so that a restarted site completes the cores from it (checked against the
fingerprint again) instead of refusing a round. An adapter of cores alone is completed from the frame
kept. A site that does not hold that frame (a lost message, a restart without a state directory) never
trains or evaluates from other factors: it refuses with one line, and the server sends the frame next
time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedtune.core.arrays import Arrays
from fedtune.core.atomic import write_atomic_file
from fedtune.core.errors import ConfigError
from fedtune.model.sb import fingerprint, frame_of
from fedtune.wire import keys
from fedtune.wire.records import arrays_from_record, record_from_arrays

STATE_KEY = "fedtune.sb-frame"  # ArrayRecord: the frame
FINGERPRINT_KEY = "fedtune.sb-frame.fingerprint"  # ConfigRecord: its fingerprint


def complete(arrays: Arrays, named: str | None, held: tuple[str, Arrays] | None) -> tuple[Arrays, Arrays | None]:
    """(the whole adapter, the frame to keep or None) from a received adapter ``arrays`` whose index
    names the frame ``named`` (None: not LoRA-SB's framed downlink, taken as it is), given the frame
    this site ``held`` (fingerprint, arrays) if any. ConfigError, in one line, when the frame received
    does not match its fingerprint or the site does not hold the frame the cores need."""
    if named is None:
        return arrays, None
    received = frame_of(arrays)
    if received:
        if fingerprint(received) != named:
            raise ConfigError(
                f"LoRA-SB: the fixed A and B from the server do not match their fingerprint {named[:12]}; "
                "refusing them."
            )
        return arrays, received
    if held is None or held[0] != named:
        has = f"holds frame {held[0][:12]}" if held else "holds no frame"
        raise ConfigError(
            f"LoRA-SB: the server sent only the cores, for the fixed A and B {named[:12]}, and this site {has} "
            "(restarted, or a message was lost); refusing the round, the server sends them next time."
        )
    return {**held[1], **arrays}, None


def named_frame(index: Mapping[str, Any] | None) -> str | None:
    """The frame fingerprint an adapter's index names, if any."""
    value = (index or {}).get(keys.FRAME)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"the adapter's `{keys.FRAME}` entry must be a fingerprint string, got {value!r}.")
    return value


def held(context: Context) -> tuple[str, Arrays] | None:
    """The frame this site keeps in its ``context.state``: (fingerprint, arrays), or None."""
    state = context.state
    if STATE_KEY not in state.array_records or FINGERPRINT_KEY not in state.config_records:
        return None
    return str(state.config_records[FINGERPRINT_KEY]["fingerprint"]), arrays_from_record(state.array_records[STATE_KEY])


def frame_path(context: Context, named: str) -> Path | None:
    """Where the site keeps frame ``named`` on disk: its state directory, if it has one."""
    where = context.node_config.get(keys.STATE_DIR)
    if not where or len(named) != 64 or not all(c in "0123456789abcdef" for c in named):  # SHA-256 hex only
        return None
    return Path(str(where)).expanduser() / f"sb-frame-{named}.safetensors"


def keep(context: Context, frame: tuple[str, Arrays]) -> None:
    """Keep ``frame`` (fingerprint, arrays) in ``context.state``, in place of any other, and in the
    site's state directory (atomically: a temp file, then a rename)."""
    _hold(context, frame)
    path = frame_path(context, frame[0])
    if path is not None:  # written each time a frame arrives: a copy that stopped matching is replaced
        as_fingerprinted = {k: np.ascontiguousarray(v, np.float32) for k, v in frame[1].items()}
        write_atomic_file(path, lambda tmp: save_file(as_fingerprinted, str(tmp)))


def _hold(context: Context, frame: tuple[str, Arrays]) -> None:
    context.state.array_records[STATE_KEY] = record_from_arrays(frame[1])
    context.state.config_records[FINGERPRINT_KEY] = ConfigRecord({"fingerprint": frame[0]})


def _from_disk(context: Context, named: str) -> tuple[str, Arrays] | None:
    """Frame ``named`` from the site's state directory, checked against its fingerprint, and kept in
    ``context.state``; None when it is not there. ConfigError, in one line naming the file, when it
    cannot be read or does not match."""
    path = frame_path(context, named)
    if path is None or not path.is_file():
        return None
    try:
        arrays: Arrays = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"LoRA-SB: cannot read the kept fixed A and B {path}: {exc}; delete it.") from None
    if fingerprint(arrays) != named:
        raise ConfigError(f"LoRA-SB: the kept fixed A and B {path} do not match their fingerprint; delete it.")
    _hold(context, (named, arrays))
    return named, arrays


def adapter(
    arrays: Arrays, index: Mapping[str, Any] | None, context: Context
) -> tuple[Arrays, tuple[str, Arrays] | None]:
    """(the whole global adapter, the frame to :func:`keep` once it fits the model, or None) from a
    received adapter and its index (:func:`complete`)."""
    named = named_frame(index)
    if named is None:
        return arrays, None
    kept = None
    if not frame_of(arrays):  # cores alone: the frame this site holds, from its state directory after a restart
        kept = held(context)
        if kept is None or kept[0] != named:
            kept = _from_disk(context, named) or kept
    whole, received = complete(arrays, named, kept)
    return whole, (named, received) if received is not None else None
