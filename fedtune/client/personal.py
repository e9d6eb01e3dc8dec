"""A site's personal adapter: FedSA-LoRA's own B across rounds, local adaptation after the last round,
and the personal adapter's held-out loss and PEFT folder.

Under ``lora.share = a`` (FedSA-LoRA, Guo et al., ICLR 2025, https://arxiv.org/abs/2410.01463) a site
trains A and B but sends only A; its B stays here (``client/store.py``) and its personal adapter is
(global A, own B). Under ``personalize.local-steps = N`` the site fine-tunes the final adapter for N
steps on its own training data when it evaluates the last round. The personal adapter never leaves
the site: only its held-out loss goes into the eval reply.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context

from fedtune.client import store
from fedtune.client.site import Site
from fedtune.client.trainer import train_local
from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.atomic import write_atomic_dir
from fedtune.core.errors import ConfigError
from fedtune.model import sb
from fedtune.model.adapters import adapter_arrays, load_adapter_arrays, write_peft_folder
from fedtune.model.methods import METHODS, peft_config
from fedtune.model.scoring import heldout_loss
from fedtune.model.share import kept_keys, personal
from fedtune.wire import keys

log = logging.getLogger(__name__)

SIMULATED = frozenset({keys.PARTITION_ID, keys.NUM_PARTITIONS})  # the node config a simulation engine gives


def _run_id(extra: Mapping[str, Any]) -> str:
    return str(extra.get(keys.RUN_ID, "run"))


def adopt_own(
    cfg: RunConfig, model: Any, context: Context, extra: Mapping[str, Any], site: Site, *, evaluating: bool = False
) -> bool:
    """Under ``lora.share = a``: put the site's own B (once it has one) over the global B in ``model``;
    whether it did."""
    if cfg.lora.share != "a":
        return False
    rnd = int(extra[keys.ROUND])
    upto = rnd if evaluating else rnd - 1  # training round r starts from the B of round r - 1
    own = store.restore(context, _run_id(extra), site.name, upto)
    if own is None:
        return False
    current = adapter_arrays(model)
    wrong = [k for k in kept_keys(current, cfg.lora) if k not in own or own[k].shape != current[k].shape]
    if wrong:
        raise ConfigError(
            f"{site.name}: its own adapter part (in {store.state_dir(context)}) does not match the model at "
            f"rank {site.rank} (first: {wrong[0]}); was its `lora.r` changed mid-run?"
        )
    load_adapter_arrays(model, personal(current, own))
    return True


def keep_own(cfg: RunConfig, trained: Arrays, context: Context, extra: Mapping[str, Any], site: Site) -> None:
    """Under ``lora.share = a``: keep the site's trained B for its next round (and a restart)."""
    if cfg.lora.share == "a":
        own = {k: trained[k] for k in kept_keys(trained, cfg.lora)}
        store.keep(own, context, _run_id(extra), site.name, int(extra[keys.ROUND]))


def evaluate_personal(
    cfg: RunConfig, model: Any, context: Context, extra: Mapping[str, Any], site: Site
) -> dict[str, Any]:
    """The personal adapter's held-out loss (``personal-eval-loss``), when the site has one this round:
    (global A, own B) under ``lora.share = a``, then fine-tuned for ``personalize.local-steps`` after the
    last round. ``model`` holds the global adapter, already evaluated. The adapter is written as a PEFT
    folder where the site keeps its outputs (:func:`adapter_dir`)."""
    rnd = int(extra[keys.ROUND])
    owns = adopt_own(cfg, model, context, extra, site, evaluating=True)
    adapt = cfg.personalize.local_steps > 0 and rnd == cfg.num_server_rounds
    if not owns and not adapt:
        return {}
    if adapt:
        _adapt(cfg, model, site)
    pad_id = int(site.loaded.tokenizer.pad_token_id)
    loss = heldout_loss(model, site.heldout, batch_size=cfg.eval.batch_size, pad_id=pad_id)
    where = adapter_dir(cfg, context.node_config)
    if where is not None and METHODS[cfg.peft.method].peft:  # bitfit / full: the trained weights are the model
        arrays = sb.fold(adapter_arrays(model))  # LoRA-SB: a vanilla LoRA folder
        config = peft_config(cfg, site.rank or None)
        write_atomic_dir(where, lambda tmp: write_peft_folder(tmp, arrays, config, site.loaded.path))
        log.info("%s: personal adapter (round %d, held-out loss %.4f) in %s", site.name, rnd, loss, where)
    return {keys.PERSONAL_EVAL_LOSS: loss}


def _adapt(cfg: RunConfig, model: Any, site: Site) -> None:
    """``personalize.local-steps`` steps of plain local training on the site's own training data."""
    seed = zlib.crc32(f"{cfg.seed}:personalize:{site.name}".encode())
    torch.manual_seed(seed)  # LoRA dropout
    train = dataclasses.replace(cfg.train, local_steps=cfg.personalize.local_steps)
    train_local(
        model,
        site.train,
        train,
        pad_id=int(site.loaded.tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(seed),
        desc=f"{site.name} local adaptation",
    )


def adapter_dir(cfg: RunConfig, node_config: Mapping[str, Any]) -> Path | None:
    """Where the site writes its personal adapter: ``DIR/adapter`` for a deployed site started with
    ``fedtune client --out DIR``; ``OUT/sites/site-<partition>/adapter`` in a simulation, where the
    operator owns every site; None otherwise (the adapter is then only evaluated)."""
    if node_config.get(keys.SITE_OUT):
        return Path(str(node_config[keys.SITE_OUT])).expanduser() / "adapter"
    if set(node_config) - {keys.GRID_DELAYS} == SIMULATED and cfg.output.dir:  # the shared grid adds its flag
        return Path(cfg.output.dir) / "sites" / f"site-{node_config[keys.PARTITION_ID]}" / "adapter"
    return None
