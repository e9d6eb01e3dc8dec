"""The ``shared`` simulation backend: every site's ClientApp runs in this process, in turn.

One process holds one copy of the base model (``fedtune.models`` keeps it resident) and the sites
take turns on it: each message is handed to the real ClientApp with that site's own Context, so a
site keeps its node config and its context state across rounds exactly as under Ray. This is the
backend for many sites on one machine; the Ray backend stays for several processes and GPUs.

Between turns a site keeps only what it needs for its next one: its Context (node config and
``context.state``) and its tokenized data (``fedtune.client.site``). Its adapter, optimizer and RNG
are rebuilt from the message each turn: the global adapter is loaded into the shared LoRA slot,
AdamW starts fresh, and the torch RNG is seeded from (seed, round, site).

``simulation.site-delays`` makes chosen sites slower without stopping the others: a site's reply is
held back for its extra seconds per local step after it is computed, while the next sites compute,
as a slow machine elsewhere would (``keys.GRID_DELAYS`` tells the site not to sleep itself).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable, Iterable
from typing import cast
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict

from fedtune.config.outputs import SimulationConfig
from fedtune.wire import keys

log = logging.getLogger(__name__)

ClientCallable = Callable[[Message, Context], Message]
ERROR_CODE = 2  # the ClientApp raised instead of replying
LONGEST_WAIT = 1.0  # seconds a pull waits for a held reply before answering with nothing


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return cast(Callable[[int], int], ctypes.CDLL(None).malloc_trim)
    except (AttributeError, OSError):  # not glibc (macOS, musl): nothing to trim
        return None


_TRIM = _malloc_trim()


def release_heap() -> None:
    """Hand the heap pages freed by the last turn back to the OS (glibc ``malloc_trim``).

    Each turn frees its activations, gradients and arrays, but glibc keeps the freed pages, and
    the next site's differently sized batches fragment them further: without this, resident memory
    of SmolLM2 on 30 sites climbs by about 0.6 GiB over the first round (BENCHMARKS.md). The call
    takes microseconds.
    """
    if _TRIM is not None:
        _TRIM(0)


def _set_task_identity() -> None:
    # Messages carry the run's identity; Flower's runtimes set it, an in-process grid must too.
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("task_id", "run_id", "node_id"):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, 0 if name == "node_id" else 1)


class LocalGrid:
    """A Grid whose nodes are ClientApps called in this process, one message after another."""

    in_process = True  # the round loop must not evaluate on the same model concurrently

    def __init__(self, client_app: ClientCallable, num_sites: int) -> None:
        _set_task_identity()
        self.client_app = client_app
        self.contexts = {
            pid + 1: Context(
                run_id=1,
                node_id=pid + 1,
                node_config={keys.PARTITION_ID: pid, keys.NUM_PARTITIONS: num_sites, keys.GRID_DELAYS: True},
                state=RecordDict(),
                run_config={},
            )
            for pid in range(num_sites)
        }
        self.pending: dict[str, Message] = {}
        self.held: dict[str, tuple[float, Message]] = {}
        """Replies of slowed sites (``simulation.site-delays``) and when they may be returned."""

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = message_id = str(uuid4())  # as Flower's grids do
            self.pending[message_id] = msg
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The held replies whose time has come; else run the next pending site (in the order sent) and
        return its reply, or hold it when the site is slowed and run the next; else wait (up to a second)
        for the first held reply. One computed reply in memory at a time, unless sites are slowed."""
        wanted = set(message_ids)
        while True:
            if ready := self._ready(wanted):
                return ready
            message_id = next((m for m in self.pending if m in wanted), None)
            if message_id is None:
                break
            msg = self.pending.pop(message_id)
            reply = self._handle(msg)
            hold = _delay(msg, reply, self.contexts[msg.metadata.dst_node_id])
            if hold <= 0:
                return [reply]
            self.held[message_id] = (time.monotonic() + hold, reply)
        due = [self.held[m][0] for m in wanted if m in self.held]
        if due:
            time.sleep(min(max(0.0, min(due) - time.monotonic()), LONGEST_WAIT))
        return self._ready(wanted)

    def _ready(self, wanted: set[str]) -> list[Message]:
        now = time.monotonic()
        ready = sorted((self.held[m][0], m) for m in wanted if m in self.held and self.held[m][0] <= now)
        return [self.held.pop(m)[1] for _, m in ready]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._handle(msg) for msg in messages]

    def _handle(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            return self.client_app(msg, context)
        except Exception as exc:  # a crashing site must not take the federation down
            log.exception("node %d raised", msg.metadata.dst_node_id)
            return Message(Error(code=ERROR_CODE, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        finally:
            release_heap()


def _delay(msg: Message, reply: Message, context: Context) -> float:
    """Seconds a train reply is held: the site's ``simulation.site-delays`` entry times its local steps."""
    if reply.has_error() or not reply.has_content() or keys.SPEC not in msg.content.config_records:
        return 0.0
    delays = msg.content.config_records[keys.SPEC].get("simulation.site-delays", "")
    metrics = reply.content.metric_records.get(keys.METRICS)
    steps = metrics.get(keys.STEPS, 0) if metrics is not None else 0
    pid = context.node_config[keys.PARTITION_ID]
    if not delays or not isinstance(steps, int) or not isinstance(pid, int):
        return 0.0
    return SimulationConfig(site_delays=str(delays)).delay(pid) * steps
