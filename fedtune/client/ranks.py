"""The data-parallel ranks 1..P-1 of a site: spawned once per process, resident between rounds.

A site with ``train.num-processes`` = P > 1 trains on P processes (``fedtune.client.parallel``);
the process that runs the ClientApp (the site worker, a Ray actor, or the ``shared`` backend's
process) is rank 0. The other ranks are spawned the first time such a round comes and then live as
long as that process: each keeps its base model loaded (``fedtune.model.loading`` keeps one
resident copy per process), and a round only sends them a :class:`Job` through their queue. The
process group is set up afresh each round over a new FileStore file, so a round that fails leaves
nothing behind for the next: the pool is closed and the next round spawns a new one.

Ranks stop when rank 0 closes the pool (at the end of the site worker, at interpreter exit), and
on their own within :data:`JOB_POLL_S` when the process that spawned them is gone (killed by Ray,
``kill -9``), so they never outlive it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fedtune.client.trainer import train_local
from fedtune.config import RunConfig, Scalar
from fedtune.core.arrays import Arrays
from fedtune.core.errors import FedtuneError
from fedtune.data.prompts import Example
from fedtune.model import threads

log = logging.getLogger(__name__)

JOB_POLL_S = 0.5
"""How often an idle rank checks that the process that spawned it is still there."""
CLOSE_WAIT_S = 10.0
"""How long :meth:`RankPool.close` waits for a rank to leave before terminating it."""

READY, DONE = "ready", "done"


@dataclass(frozen=True)
class Job:
    """One round of a site's training, as every rank needs it to rebuild rank 0's setup exactly."""

    job_id: int
    flat: dict[str, Scalar]
    """The site's effective config (round spec with the site's own keys over it)."""
    examples: list[Example]
    """The site's tokenized training examples (sent, not re-read: every rank sees the same)."""
    lora_rank: int
    """The site's LoRA rank (0 for a ``peft.method`` other than lora)."""
    pad_id: int
    start: Arrays
    """The global adapter as the site received it (sliced to its rank)."""
    seed: int
    """Seeds the batch order (same on every rank) and, plus the rank, LoRA dropout."""
    proximal_mu: float
    store: str
    """Path of this round's FileStore, where the ranks meet."""
    world: int


def backend(device: torch.device) -> str:
    """The process-group backend for ``device``: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def join(job: Job, rank: int, device: torch.device, timeout_s: float) -> None:
    """Join this round's process group (``job.store``) as ``rank``."""
    store = dist.FileStore(job.store, job.world)  # type: ignore[attr-defined]
    dist.init_process_group(
        backend(device), store=store, rank=rank, world_size=job.world, timeout=timedelta(seconds=timeout_s)
    )


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _train(job: Job, rank: int, reports: Any) -> None:
    """One round on a spawned rank: the resident base and the global adapter, its shards, a report."""
    from fedtune.model.adapters import load_adapter_arrays
    from fedtune.model.loading import pick_device
    from fedtune.model.methods import load_for, wrap

    cfg = RunConfig.from_flat(job.flat)
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(rank)  # "cuda" below then means this rank's GPU
    else:  # the CPU ranks share the site's cores (train.num-threads: per rank)
        threads.apply(cfg.train.num_threads, job.world)
    model = wrap(load_for(cfg, pick_device(cfg.train.device)), cfg, job.lora_rank or None)  # loaded once
    load_adapter_arrays(model, job.start)
    reports.put((rank, job.job_id, READY))
    join(job, rank, next(model.parameters()).device, cfg.server.round_timeout)
    try:
        torch.manual_seed(job.seed + rank)
        train_local(
            model,
            job.examples,
            cfg.train,
            pad_id=job.pad_id,
            generator=torch.Generator().manual_seed(job.seed),
            desc=f"rank {rank}",
            proximal_mu=job.proximal_mu,
            rank=rank,
            world=job.world,
        )
    finally:
        dist.destroy_process_group()
    reports.put((rank, job.job_id, DONE))


def rank_main(rank: int, jobs: Any, reports: Any, parent: int) -> None:
    """A spawned rank's life: take jobs until told to stop (``None``) or its parent is gone."""
    while True:
        try:
            job = jobs.get(timeout=JOB_POLL_S)
        except queue_module.Empty:
            if os.getppid() != parent:  # rank 0's process died without closing the pool
                return
            continue
        if job is None:
            return
        try:
            _train(job, rank, reports)
        except BaseException as exc:  # report, then leave: rank 0 closes the pool and respawns
            reports.put((rank, job.job_id, _first_line(exc)))
            raise


class RankPool:
    """Ranks 1..world-1, spawned now, fed one :class:`Job` a round by rank 0."""

    spawned = 0
    """Rank processes started in this process so far (a round that reuses the pool adds none)."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")  # CUDA cannot be forked, and spawn behaves the same on every OS
        self.world = world
        self._dir = tempfile.mkdtemp(prefix="fedtune-ddp-")
        self._reports = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(1, world)]
        self._next_id = 0
        self.procs = [
            ctx.Process(target=rank_main, args=(r, q, self._reports, os.getpid()), name=f"{r}", daemon=True)
            for r, q in zip(range(1, world), self._jobs, strict=True)
        ]
        for proc in self.procs:
            proc.start()
            RankPool.spawned += 1

    def pids(self) -> list[int]:
        """The ranks' process ids (rank 1 first)."""
        return [int(p.pid or 0) for p in self.procs]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def job(self, **fields: Any) -> Job:
        """A new job with its own id and FileStore path."""
        self._next_id += 1
        store = os.path.join(self._dir, f"store-{self._next_id}")
        return Job(job_id=self._next_id, store=store, world=self.world, **fields)

    def submit(self, job: Job) -> None:
        for jobs in self._jobs:
            jobs.put(job)

    def wait(self, job: Job, what: str, timeout_s: float, where: str) -> None:
        """Wait until every rank reports ``what`` for ``job``, or fail naming the first that did not."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < len(self.procs):
            try:
                rank, job_id, status = self._reports.get(timeout=JOB_POLL_S)
            except queue_module.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    raise FedtuneError(
                        f"{where}: data-parallel rank {dead[0].name} exited with status {dead[0].exitcode}."
                    ) from None
                if time.monotonic() > deadline:
                    raise FedtuneError(f"{where}: data-parallel ranks not {what} after {timeout_s:.0f} s.") from None
                continue
            if job_id != job.job_id:
                continue  # a stale report from an earlier, failed round
            if status != what:
                raise FedtuneError(f"{where}: data-parallel rank {rank} failed: {status}")
            seen.add(rank)
        if what == DONE:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(job.store)

    def close(self) -> None:
        """Tell every rank to stop, wait, terminate any that stays, and remove the stores."""
        for jobs in self._jobs:
            with contextlib.suppress(ValueError, OSError):  # the queue is already closed
                jobs.put(None)
        deadline = time.monotonic() + CLOSE_WAIT_S
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for q in (*self._jobs, self._reports):
            q.close()
            q.join_thread()
        shutil.rmtree(self._dir, ignore_errors=True)


_POOL: RankPool | None = None


def pool_for(world: int) -> RankPool:
    """This process's pool of ``world`` - 1 ranks: the resident one, or a new one when there is
    none, its size differs, or a rank is gone."""
    global _POOL
    if _POOL is not None and (_POOL.world != world or not _POOL.alive()):
        shutdown()
    if _POOL is None:
        _POOL = RankPool(world)
        log.info("data-parallel ranks 1..%d started (pids %s)", world - 1, _POOL.pids())
    return _POOL


def resident() -> RankPool | None:
    """This process's pool, if it has one."""
    return _POOL


def shutdown() -> None:
    """Stop this process's ranks, if any (the site worker calls this when it ends; also at exit)."""
    global _POOL
    pool, _POOL = _POOL, None
    if pool is not None:
        pool.close()


atexit.register(shutdown)
