"""torch CPU threads per training process: ``train.num-threads``, or the automatic choice (0).

torch's default runs one thread per core in every process. Two training processes on the same
cores (a simulation's clients, a site's data-parallel ranks, the sites of a federation on one
machine) then make OpenMP threads wait for each other, and a step gets several times slower. The
automatic choice therefore divides the cores this process may use (``os.sched_getaffinity``) by the
training processes fedtune itself runs on this machine, which whoever starts them announces in
:data:`PROCESSES_ENV` (inherited by the processes it starts). Other work on the machine is not
counted: set ``train.num-threads`` (or ``OMP_NUM_THREADS``, which caps the automatic choice).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROCESSES_ENV = "FEDTUNE_TRAINING_PROCESSES"
"""Training processes fedtune runs at once on this machine, set by the command that starts them."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; all cores where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        return os.cpu_count() or 1


def training_processes() -> int:
    """The count in :data:`PROCESSES_ENV`, 1 when unset or not a positive integer."""
    text = os.environ.get(PROCESSES_ENV, "")
    return int(text) if text.isdigit() and int(text) >= 1 else 1


def announce(processes: int) -> None:
    """Tell this process and the ones it starts that ``processes`` train at once on this machine."""
    os.environ[PROCESSES_ENV] = str(max(1, processes))


@dataclass(frozen=True)
class Choice:
    """A thread count and why."""

    threads: int
    reason: str


def choose(setting: int, ranks: int = 1) -> Choice:
    """The threads of one training process under ``train.num-threads`` = ``setting``.

    ``ranks`` is the data-parallel processes of this site: each counts as a training process.
    """
    if setting:
        return Choice(setting, "train.num-threads")
    processes = training_processes() * max(1, ranks)
    cores = usable_cores()
    return _capped(
        max(1, cores // processes), f"auto: {cores} usable core(s) / {processes} training process(es) on this machine"
    )


def beside(clients: int) -> Choice:
    """The threads of a process that computes while ``clients`` training processes of its own run
    compute on the same cores: a simulation's server, whose centralized evaluation and final sample
    answers overlap with the clients' federated evaluation. It counts itself as one more process."""
    cores = usable_cores()
    return _capped(
        max(1, cores // (clients + 1)), f"auto: {cores} usable core(s) / ({clients} concurrent client(s) + the server)"
    )


def _capped(threads: int, reason: str) -> Choice:
    """An automatic choice, capped by an explicit ``OMP_NUM_THREADS``."""
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and 1 <= int(cap) < threads:
        return Choice(int(cap), f"{reason}, capped by OMP_NUM_THREADS")
    return Choice(threads, reason)


def apply(setting: int, ranks: int = 1) -> Choice:
    """Set this process's torch threads (one of ``ranks`` data-parallel ranks) and return the choice."""
    import torch  # here: the launchers import this module only to announce, without torch

    choice = choose(setting, ranks)
    torch.set_num_threads(choice.threads)
    return choice


def log_choice(who: str, choice: Choice, ranks: int = 1) -> None:
    """One line: the torch threads of each of ``who``'s training processes, and why."""
    per = f" per process x {ranks} data-parallel ranks" if ranks > 1 else ""
    log.info("%s: %d torch thread(s)%s (%s)", who, choice.threads, per, choice.reason)
