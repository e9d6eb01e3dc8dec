"""The site's update pipeline: open the site for a round, train (plain, data-parallel or DP-SGD),
form the delta, apply the mechanism's client step; and the site's held-out evaluation.

Plain functions of (message, context); ``client/app.py`` only adapts them to Flower's ClientApp.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message

from fedtune.client import frame, personal
from fedtune.client.dp_trainer import DPSettings, sample_rate, train_dp
from fedtune.client.parallel import train_parallel
from fedtune.client.site import Site, open_site
from fedtune.client.trainer import TrainResult, train_local
from fedtune.config import SITE_KEYS, SITE_PRIVACY_KEYS, RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import ConfigError, UpdateRejected
from fedtune.core.paths import fedtune_home
from fedtune.model import task_metrics
from fedtune.model.adapters import adapter_arrays, adapter_shapes, load_adapter_arrays
from fedtune.model.generation import task_scores
from fedtune.model.lora import rank_slice
from fedtune.model.scoring import heldout_loss
from fedtune.model.share import sent_keys
from fedtune.privacy import compat
from fedtune.privacy import site as site_privacy
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.strategies import STRATEGIES
from fedtune.wire import keys
from fedtune.wire.codec import Scheme
from fedtune.wire.records import decode

log = logging.getLogger(__name__)


def open_round(msg: Message, context: Context) -> tuple[RunConfig, dict[str, Any], Site]:
    """Decode the round's spec and open the site (no adapter needed)."""
    spec = dict(msg.content.config_records[keys.SPEC])
    extra = {k: spec.pop(k) for k in (keys.ROUND, keys.RUN_ID, keys.DP_PLANNED_STEPS) if k in spec}
    if not isinstance(extra.get(keys.ROUND), int):
        raise ConfigError(f"round spec: `{keys.ROUND}` must be an integer, got {extra.get(keys.ROUND)!r}.")
    local = {k: v for k, v in context.node_config.items() if k in SITE_KEYS and k != "lora.r"}
    if not MECHANISMS.get(str(spec.get("privacy.mechanism", "none"))).site_ledger:  # only DP-SGD sites account
        local = {k: v for k, v in local.items() if k not in SITE_PRIVACY_KEYS}
    cfg = RunConfig.from_flat({**spec, **local})  # the site's own settings win over the spec
    compat.check_round(cfg)  # the server checked the spec; the site's own settings may not compose with it
    return cfg, extra, open_site(cfg, context.node_config, context.state)


def open_with_adapter(msg: Message, context: Context) -> tuple[RunConfig, dict[str, Any], Site, Any]:
    """Decode the round's spec, open the site, and load the global adapter (sliced to its rank; under
    LoRA-SB completed with the fixed A and B the site keeps, ``client/frame.py``)."""
    cfg, extra, site = open_round(msg, context)
    model = site.model(cfg)
    try:
        arrays = decode(msg.content, keys.ADAPTER, Scheme.of(cfg.compression, "downlink"))
        arrays, received = frame.adapter(arrays, msg.content.config_records.get(keys.WIRE), context)  # LoRA-SB
        arrays = _fit(rank_slice(arrays, site.rank), adapter_shapes(model))
    except (UpdateRejected, IndexError) as exc:  # rank_slice of an array with too few dimensions: IndexError
        raise ConfigError(f"the global adapter from the server is malformed: {exc}") from None
    if received is not None:  # LoRA-SB's fixed A and B, checked: later adapters are the cores alone
        frame.keep(context, received)
    load_adapter_arrays(model, arrays)
    return cfg, extra, site, model


def _fit(arrays: Arrays, shapes: dict[str, tuple[int, ...]]) -> Arrays:
    """``arrays`` if they are exactly the model's trainable names and shapes; else UpdateRejected."""
    if set(arrays) != set(shapes):
        odd = sorted(set(arrays) ^ set(shapes))
        raise UpdateRejected(f"its arrays are not the model's ({len(odd)} differ, e.g. {odd[0]!r})")
    for key, value in arrays.items():
        if tuple(value.shape) != shapes[key]:
            raise UpdateRejected(f"{key!r} has shape {tuple(value.shape)}, the model's is {shapes[key]}")
    return arrays


def budget_path(context: Context, extra: dict[str, Any], site: Site) -> Path:
    state_dir = Path(str(context.node_config.get(keys.STATE_DIR) or fedtune_home() / "site-state"))
    return site_privacy.state_file(state_dir.expanduser(), str(extra.get(keys.RUN_ID, "run")), site.name)


@dataclass(frozen=True)
class LocalUpdate:
    """One round of local training: the delta (None when a dp-sgd site declines) and its metrics."""

    cfg: RunConfig
    extra: dict[str, Any]
    site: Site
    delta: Arrays | None
    """local - global per PEFT key (only B under FFA-LoRA), clipped / noised as the mechanism says."""
    metrics: dict[str, Any]


def local_update(msg: Message, context: Context) -> LocalUpdate:
    """Open the site, train the global adapter locally (plain or DP-SGD) and compute the delta."""
    opened = time.perf_counter()
    cfg, extra, site, model = open_with_adapter(msg, context)
    personal.adopt_own(cfg, model, context, extra, site)  # lora.share = a: the site's own B
    trained = time.perf_counter()
    rnd = extra[keys.ROUND]
    mechanism = MECHANISMS.get(cfg.privacy.mechanism)
    start = adapter_arrays(model)
    seed = zlib.crc32(f"{cfg.seed}:{rnd}:{site.name}".encode())
    torch.manual_seed(seed)  # LoRA dropout; same result whichever process runs this site
    desc = f"{site.name} round {rnd}"
    metrics: dict[str, Any] = {keys.NUM_EXAMPLES: len(site.train), keys.LORA_RANK: site.rank}
    if mechanism.site_ledger:  # DP-SGD: the site trains privately and keeps its own ledger
        private = _train_private(cfg, extra, site, model, context, metrics, desc)
        if private is None:
            return LocalUpdate(cfg, extra, site, None, metrics)
        result = private
    else:
        result = _train_plain(cfg, site, model, start, seed, desc)
    end = adapter_arrays(model)
    personal.keep_own(cfg, end, context, extra, site)
    delta = {k: (end[k] - start[k]).astype(np.float32) for k in sent_keys(start, cfg.lora)}
    delta = mechanism.client_step(cfg, delta, metrics)
    clear = mechanism.clear_site_metrics
    if clear and not math.isnan(result.loss):
        metrics[keys.TRAIN_LOSS] = result.loss  # under DP a clear-text training loss would leak
    if clear:  # data-dependent counts no DP guarantee covers: not sent under DP
        metrics.update({keys.DATA_CHECK + k.replace("_", "-"): v for k, v in site.data_checks.items()})
    metrics[keys.STEPS] = result.steps
    if clear:  # seconds follow the data (Poisson batch sizes, token counts): not sent under DP
        metrics.update({keys.TIME_LOAD: trained - opened, keys.TIME_TRAIN: time.perf_counter() - trained})
    return LocalUpdate(cfg, extra, site, delta, metrics)


def _train_private(
    cfg: RunConfig,
    extra: dict[str, Any],
    site: Site,
    model: Any,
    context: Context,
    metrics: dict[str, Any],
    desc: str,
) -> TrainResult | None:
    """DP-SGD within the site's own budget: None (and the reason in ``metrics``) when the round would
    pass ``privacy.target-epsilon``; the ledger is saved before the delta can leave the site."""
    rnd = extra[keys.ROUND]
    path = budget_path(context, extra, site)
    budget = site_privacy.restore(context.state, path)
    q = sample_rate(len(site.train), cfg.train.batch_size * cfg.train.grad_accum_steps)
    if cfg.privacy.delta >= 1 / len(site.train):
        log.warning(
            "%s: `privacy.delta` = %g is not below 1 / its %d examples; a guarantee at that delta is weak.",
            *(site.name, cfg.privacy.delta, len(site.train)),
        )
    spend = site_privacy.plan_round(budget, cfg, q, int(extra.get(keys.DP_PLANNED_STEPS, cfg.train.local_steps)))
    if spend.exhausted:
        site_privacy.save(budget, context.state, path)
        log.warning(
            "%s: round %d would raise this site's epsilon from %.3f to %.3f, past `privacy.target-epsilon` "
            "= %g; declining (budget exhausted).",
            *(site.name, rnd, spend.epsilon_before, spend.epsilon_after, cfg.privacy.target_epsilon),
        )
        metrics.update({keys.BUDGET_EXHAUSTED: 1, keys.EPSILON: spend.epsilon_before})
        return None
    pad_id = int(site.loaded.tokenizer.pad_token_id)
    dp = DPSettings(spend.event.noise_multiplier, cfg.privacy.clip_norm, q, spend.event.steps)
    result: TrainResult = train_dp(model, site.train, cfg.train, dp, pad_id=pad_id, desc=desc)
    budget.ledger.add(spend.event)
    site_privacy.save(budget, context.state, path)  # before the delta leaves the site
    metrics.update({keys.EPSILON: spend.epsilon_after, keys.NOISE_MULTIPLIER: dp.noise_multiplier})
    return result


def _train_plain(cfg: RunConfig, site: Site, model: Any, start: Arrays, seed: int, desc: str) -> TrainResult:
    """Local AdamW steps, in this process or over the site's data-parallel ranks."""
    pad_id = int(site.loaded.tokenizer.pad_token_id)
    mu = cfg.strategy.proximal_mu if STRATEGIES.get(cfg.strategy.name).proximal else 0.0
    if cfg.train.num_processes > 1:
        return train_parallel(
            model,
            site.train,
            cfg,
            lora_rank=site.rank,
            start=start,
            seed=seed,
            pad_id=pad_id,
            desc=desc,
            proximal_mu=mu,
        )
    generator = torch.Generator().manual_seed(seed)
    return train_local(model, site.train, cfg.train, pad_id=pad_id, generator=generator, desc=desc, proximal_mu=mu)


def evaluate_site(msg: Message, context: Context) -> dict[str, Any]:
    """The global adapter's ``eval.metrics`` on this site's held-out split: the loss, and the task
    metrics on answers generated for the first ``eval.max-generate`` held-out examples."""
    cfg, extra, site, model = open_with_adapter(msg, context)
    tok = site.loaded.tokenizer
    metrics: dict[str, Any] = {keys.NUM_EXAMPLES: len(site.heldout)}
    if task_metrics.LOSS in cfg.eval.metric_names():
        metrics[keys.EVAL_LOSS] = heldout_loss(
            model, site.heldout, batch_size=cfg.eval.batch_size, pad_id=int(tok.pad_token_id)
        )
    scores, generated = task_scores(model, tok, site.heldout_records, cfg.data, cfg.eval)
    if generated:
        metrics.update({**scores, keys.NUM_GENERATED: generated})
    metrics.update(personal.evaluate_personal(cfg, model, context, extra, site))  # after the global adapter's
    return metrics
