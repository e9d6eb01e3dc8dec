"""Flower ClientApp: a thin edge that hands each message to the site's pipeline or a SecAgg+ stage."""

from __future__ import annotations

import os
import time
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client import pipeline, secagg
from fedtune.client.compress import encode_update
from fedtune.client.refusal import refuse
from fedtune.client.slowdown import slow_down
from fedtune.core.errors import FedtuneError
from fedtune.core.logs import CONSOLE_ENV, quiet_libraries, setup_logging
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.wire import keys

quiet_libraries()  # this module is the process entry point under `flwr run` / deployment
if os.environ.get(CONSOLE_ENV) == "1":
    setup_logging()  # a Ray worker: the site's start-up report shows in the run's output

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter locally and reply with the delta (local - global)."""
    try:
        update = pipeline.local_update(msg, context)
    except FedtuneError as exc:
        return refuse(msg, exc)
    slow_down(update.cfg, context.node_config, int(update.metrics.get(keys.STEPS, 0)))
    start = time.perf_counter()
    records: dict[str, Any] = {}
    if update.delta is not None:
        records = encode_update(update.delta, update.cfg, update.extra[keys.ROUND], update.site.name, context.state)
    metrics = dict(update.metrics)
    if MECHANISMS.get(update.cfg.privacy.mechanism).clear_site_metrics:  # seconds follow the data: not sent under DP
        metrics[keys.TIME_SERIALIZE] = time.perf_counter() - start
    return Message(RecordDict({**records, keys.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global adapter's ``eval.metrics`` on this site's held-out split."""
    try:
        metrics = pipeline.evaluate_site(msg, context)
    except FedtuneError as exc:
        return refuse(msg, exc)
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=msg)


# SecAgg+'s four stages (``secagg.protocol = secagg``), each a plain handler in ``client/secagg.py``.
app.query(keys.SECAGG_KEYS)(secagg.advertise_keys)
app.query(keys.SECAGG_SHARE)(secagg.share_keys)
app.train(keys.SECAGG_TRAIN)(secagg.masked_input)
app.query(keys.SECAGG_UNMASK)(secagg.unmask)
