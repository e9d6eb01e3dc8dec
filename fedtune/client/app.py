"""Flower ClientApp: a thin edge that decodes the round's message and calls the site's trainer."""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import keys
from fedtune.client.site import Site, open_site
from fedtune.client.trainer import heldout_loss, train_local
from fedtune.config import SITE_KEYS, RunConfig
from fedtune.errors import ConfigError, FedtuneError
from fedtune.logs import quiet_libraries
from fedtune.lora import rank_slice, sent_keys
from fedtune.models import adapter_arrays, load_adapter_arrays
from fedtune.strategies import STRATEGIES
from fedtune.wire import arrays_from_record, record_from_arrays

log = logging.getLogger(__name__)

quiet_libraries()  # this module is the process entry point under `flwr run` / deployment

app = ClientApp()

ERROR_CODE = 1  # Flower's Error.code for "failed precondition at the site"


def _open(msg: Message, context: Context) -> tuple[RunConfig, int, Site, Any]:
    """Decode the round's spec, open the site, and load the global adapter (sliced to its rank)."""
    spec = dict(msg.content.config_records[keys.SPEC])
    rnd = spec.pop(keys.ROUND)
    if not isinstance(rnd, int):
        raise ConfigError(f"round spec: `{keys.ROUND}` must be an integer, got {rnd!r}.")
    local = {k: v for k, v in context.node_config.items() if k in SITE_KEYS and k != "lora.r"}
    cfg = RunConfig.from_flat({**spec, **local})  # the site's own settings win over the spec
    site = open_site(cfg, context.node_config)
    model = site.model(cfg)
    load_adapter_arrays(model, rank_slice(arrays_from_record(msg.content.array_records[keys.ADAPTER]), site.rank))
    return cfg, rnd, site, model


def _refuse(msg: Message, exc: FedtuneError) -> Message:
    log.error("%s", exc)
    return Message(Error(code=ERROR_CODE, reason=str(exc)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter locally and reply with the delta (local - global)."""
    try:
        cfg, rnd, site, model = _open(msg, context)
    except FedtuneError as exc:
        return _refuse(msg, exc)
    start = adapter_arrays(model)
    seed = zlib.crc32(f"{cfg.seed}:{rnd}:{site.name}".encode())
    torch.manual_seed(seed)  # LoRA dropout; same result whichever process runs this site
    result = train_local(
        model,
        site.train,
        cfg.train,
        pad_id=int(site.loaded.tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(seed),
        desc=f"{site.name} round {rnd}",
        proximal_mu=cfg.strategy.proximal_mu if STRATEGIES.get(cfg.strategy.name).proximal else 0.0,
    )
    end = adapter_arrays(model)
    delta = {k: (end[k] - start[k]).astype(np.float32) for k in sent_keys(start, cfg.lora.freeze_a)}
    metrics = MetricRecord(
        {
            keys.TRAIN_LOSS: result.loss,
            keys.NUM_EXAMPLES: result.examples,
            keys.STEPS: result.steps,
            keys.LORA_RANK: site.rank,
        }
    )
    return Message(RecordDict({keys.DELTA: record_from_arrays(delta), keys.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out loss of the global adapter on this site's split."""
    try:
        cfg, _, site, model = _open(msg, context)
    except FedtuneError as exc:
        return _refuse(msg, exc)
    pad_id = int(site.loaded.tokenizer.pad_token_id)
    loss = heldout_loss(model, site.heldout, batch_size=cfg.eval.batch_size, pad_id=pad_id)
    metrics = MetricRecord({keys.EVAL_LOSS: loss, keys.NUM_EXAMPLES: len(site.heldout)})
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)
