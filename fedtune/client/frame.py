"""A LoRA-SB site's copy of the frame (the fixed A and B), so that the server sends it only once.

Every LoRA-SB adapter from the server names the frame's fingerprint (``fedtune.model.sb.fingerprint``,
the index's ``frame`` entry). An adapter that carries the frame is checked against that fingerprint and
its frame kept in the ClientApp's ``context.state``; an adapter of cores alone is completed from the
frame kept there. A site that does not hold that frame (a restarted site, a lost message) never trains
or evaluates from other factors: it refuses with one line, and the server sends the frame next time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context

from fedtune.core.arrays import Arrays
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


def keep(context: Context, frame: tuple[str, Arrays]) -> None:
    """Keep ``frame`` (fingerprint, arrays) in ``context.state``, in place of any other."""
    context.state.array_records[STATE_KEY] = record_from_arrays(frame[1])
    context.state.config_records[FINGERPRINT_KEY] = ConfigRecord({"fingerprint": frame[0]})


def adapter(
    arrays: Arrays, index: Mapping[str, Any] | None, context: Context
) -> tuple[Arrays, tuple[str, Arrays] | None]:
    """(the whole global adapter, the frame to :func:`keep` once it fits the model, or None) from a
    received adapter and its index (:func:`complete`)."""
    named = named_frame(index)
    if named is None:
        return arrays, None
    whole, received = complete(arrays, named, None if frame_of(arrays) else held(context))
    return whole, (named, received) if received is not None else None
