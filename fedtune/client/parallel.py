"""Data-parallel local training at a site with several accelerators: DDP over torch.distributed.

With ``train.num-processes`` = P > 1 the ClientApp's own process is rank 0 (it already holds the
base model and the global adapter) and it spawns ranks 1..P-1; each loads the same base model,
gets the site's tokenized examples and the global adapter from rank 0, and joins a process group
(NCCL on CUDA, one GPU per rank; gloo on CPU). Every rank draws the same batches and trains on its shard of
each micro-batch; DDP all-reduces the gradients, so all ranks take the same optimizer steps, and
the delta is read from rank 0's adapter. The update equals a 1-process run with the same batches
(see :func:`fedtune.client.trainer.train_local` for the loss scaling that makes this exact), up to
LoRA dropout, whose masks each rank draws itself.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_module
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fedtune.client.trainer import TrainResult, train_local
from fedtune.config import RunConfig, Scalar
from fedtune.core.arrays import Arrays
from fedtune.core.errors import FedtuneError
from fedtune.data.prompts import Example
from fedtune.model import threads

log = logging.getLogger(__name__)

READY_POLL_S = 0.5


@dataclass(frozen=True)
class Job:
    """What a spawned rank needs to rebuild the site's training exactly as rank 0 has it."""

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
    """Path of the FileStore the ranks meet at."""
    world: int


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _join(job: Job, rank: int, device: torch.device, timeout_s: float) -> None:
    store = dist.FileStore(job.store, job.world)  # type: ignore[attr-defined]
    dist.init_process_group(
        _backend(device), store=store, rank=rank, world_size=job.world, timeout=timedelta(seconds=timeout_s)
    )


def _rank_main(job: Job, rank: int, reports: Any) -> None:
    """A spawned rank: load the base and the global adapter, train its shards, report."""
    from fedtune.model.adapters import load_adapter_arrays
    from fedtune.model.loading import pick_device
    from fedtune.model.methods import load_for, wrap

    try:
        cfg = RunConfig.from_flat(job.flat)
        if cfg.train.device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(rank)  # "cuda" below then means this rank's GPU
        else:  # the CPU ranks share the site's cores (train.num-threads: per rank)
            threads.apply(cfg.train.num_threads, job.world)
        model = wrap(load_for(cfg, pick_device(cfg.train.device)), cfg, job.lora_rank or None)
        load_adapter_arrays(model, job.start)
        reports.put((rank, "ready"))
        _join(job, rank, next(model.parameters()).device, cfg.server.round_timeout)
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
    except BaseException as exc:
        reports.put((rank, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"))
        raise


def _wait_ready(procs: list[Any], reports: Any, timeout_s: float, where: str) -> None:
    """Wait until every spawned rank has loaded the site, or fail naming the first that did not."""
    ready: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(ready) < len(procs):
        try:
            rank, what = reports.get(timeout=READY_POLL_S)
        except queue_module.Empty:
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                raise FedtuneError(
                    f"{where}: data-parallel rank {dead[0].name} exited with status {dead[0].exitcode}."
                ) from None
            if time.monotonic() > deadline:
                raise FedtuneError(f"{where}: data-parallel ranks not ready after {timeout_s:.0f} s.") from None
            continue
        if what != "ready":
            raise FedtuneError(f"{where}: data-parallel rank {rank} failed: {what}")
        ready.add(rank)


def train_parallel(
    model: Any,
    examples: list[Example],
    cfg: RunConfig,
    *,
    lora_rank: int,
    start: Arrays,
    seed: int,
    pad_id: int,
    desc: str,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train this site's adapter on ``train.num-processes`` ranks; this process is rank 0.

    Parameters
    ----------
    model
        Rank 0's PeftModel with the global adapter ``start`` loaded; it ends holding the trained
        adapter, whose difference from ``start`` is the site's delta.
    examples
        The site's training examples (sent to every rank).
    cfg
        The site's effective config.
    lora_rank
        The site's LoRA rank.
    start
        The global adapter as loaded into ``model``.
    seed
        The round's seed for this site: the batch order, and LoRA dropout (plus the rank).
    """
    world = cfg.train.num_processes
    where = desc.split(" round ")[0]
    if dist.is_initialized():
        raise FedtuneError(f"{where}: a torch.distributed process group is already running in this process.")
    ctx = mp.get_context("spawn")  # CUDA cannot be forked, and spawn behaves the same on every OS
    reports = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="fedtune-ddp-") as tmp:
        job = Job(
            flat=cfg.to_flat(),
            examples=examples,
            lora_rank=lora_rank,
            pad_id=pad_id,
            start=start,
            seed=seed,
            proximal_mu=proximal_mu,
            store=os.path.join(tmp, "store"),
            world=world,
        )
        procs = [
            ctx.Process(target=_rank_main, args=(job, r, reports), name=f"{r}", daemon=True) for r in range(1, world)
        ]
        for proc in procs:
            proc.start()
        try:
            _wait_ready(procs, reports, cfg.server.round_timeout, where)
            try:
                _join(job, 0, next(model.parameters()).device, cfg.server.round_timeout)
            except RuntimeError as exc:  # e.g. a rank that died between loading and joining
                raise FedtuneError(f"{where}: data-parallel ranks could not meet: {str(exc).splitlines()[0]}") from None
            try:
                result = train_local(
                    model,
                    examples,
                    cfg.train,
                    pad_id=pad_id,
                    generator=torch.Generator().manual_seed(seed),
                    desc=f"{desc} ({world} processes)",
                    proximal_mu=proximal_mu,
                    rank=0,
                    world=world,
                )
            except RuntimeError as exc:  # a peer died mid-collective
                raise FedtuneError(f"{where}: data-parallel training failed: {str(exc).splitlines()[0]}") from None
            finally:
                dist.destroy_process_group()
            for proc in procs:
                proc.join(timeout=cfg.server.round_timeout)
                if proc.exitcode != 0:
                    raise FedtuneError(f"{where}: data-parallel rank {proc.name} exited with status {proc.exitcode}.")
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
    log.info("%s: %d data-parallel processes, %d steps", where, world, result.steps)
    return result
