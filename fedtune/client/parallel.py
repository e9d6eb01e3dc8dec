"""Data-parallel local training at a site with several accelerators: DDP over torch.distributed.

With ``train.num-processes`` = P > 1 the ClientApp's own process is rank 0 (it already holds the
base model and the global adapter); ranks 1..P-1 are resident processes (``fedtune.client.ranks``),
spawned at the first such round and kept, with their base model loaded, for as long as this
process lives. Each round sends them the site's tokenized examples and the global adapter, and all
P join a fresh process group (NCCL on CUDA, one GPU per rank; gloo on CPU). Every rank draws the
same batches and trains on its shard of each micro-batch; DDP all-reduces the gradients, so all
ranks take the same optimizer steps, and the delta is read from rank 0's adapter. The update equals
a 1-process run with the same batches (see :func:`fedtune.client.trainer.train_local` for the loss
scaling that makes this exact), up to LoRA dropout, whose masks each rank draws itself.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from fedtune.client import ranks
from fedtune.client.trainer import TrainResult, train_local
from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import FedtuneError
from fedtune.data.prompts import Example

log = logging.getLogger(__name__)


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
    timeout = cfg.server.round_timeout
    pool = ranks.pool_for(world)
    job = pool.job(
        flat=cfg.to_flat(),
        examples=examples,
        lora_rank=lora_rank,
        pad_id=pad_id,
        start=start,
        seed=seed,
        proximal_mu=proximal_mu,
    )
    try:
        pool.submit(job)
        pool.wait(job, ranks.READY, timeout, where)
        result = _train_rank0(model, examples, cfg, job, desc, where)
        pool.wait(job, ranks.DONE, timeout, where)
    except BaseException:
        ranks.shutdown()  # a rank may be stuck in a collective: the next round starts afresh
        raise
    log.info("%s: %d data-parallel processes (resident ranks %s), %d steps", where, world, pool.pids(), result.steps)
    return result


def _train_rank0(
    model: Any, examples: list[Example], cfg: RunConfig, job: ranks.Job, desc: str, where: str
) -> TrainResult:
    try:
        ranks.join(job, 0, next(model.parameters()).device, cfg.server.round_timeout)
    except RuntimeError as exc:  # e.g. a rank that died between loading and joining
        raise FedtuneError(f"{where}: data-parallel ranks could not meet: {str(exc).splitlines()[0]}") from None
    try:
        return train_local(
            model,
            examples,
            cfg.train,
            pad_id=job.pad_id,
            generator=torch.Generator().manual_seed(job.seed),
            desc=f"{desc} ({job.world} processes)",
            proximal_mu=job.proximal_mu,
            rank=0,
            world=job.world,
        )
    except RuntimeError as exc:  # a peer died mid-collective
        raise FedtuneError(f"{where}: data-parallel training failed: {str(exc).splitlines()[0]}") from None
    finally:
        dist.destroy_process_group()
