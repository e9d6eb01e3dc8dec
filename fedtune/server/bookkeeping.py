"""What both round kinds (plain and SecAgg+) do with what they learned: record sites' privacy answers,
charge the round to the ledger, and take the server optimizer's step."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Message

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.privacy import rounds as privacy
from fedtune.privacy.accounting import Event
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.server import validation
from fedtune.server.state import ServerState
from fedtune.strategies import STRATEGIES, make_optimizer
from fedtune.wire import keys

log = logging.getLogger(__name__)


def declined(reply: Message, node: int, state: ServerState) -> bool:
    """A "budget exhausted" reply: not an error; the node is never sampled again. UpdateRejected if the
    epsilon it reports is malformed (then nothing is recorded)."""
    if reply.has_error():
        return False
    metrics: Mapping[str, Any] = reply.content.metric_records.get(keys.METRICS, {})
    if metrics.get(keys.BUDGET_EXHAUSTED) != 1:
        return False
    record_site_epsilon(validation.reported_epsilon(metrics), node, state)
    if node not in state.privacy.exhausted:
        state.privacy.exhausted.append(node)
    log.info("node %d has spent its privacy budget and will not be sampled again", node)
    return True


def record_site_epsilon(eps: float | None, node: int, state: ServerState) -> None:
    """Keep the largest epsilon ``node`` has reported (checked by ``validation.reported_epsilon``)."""
    if eps is not None:
        state.privacy.site_epsilon[node] = max(eps, state.privacy.site_epsilon.get(node, 0.0))


def account_round(cfg: RunConfig, state: ServerState, rnd: int, *, released: bool, event: Event | None = None) -> None:
    """Charge the round to the run's ledger: ``event`` (what the round really released), else its
    user-level event, or an un-noised release. ``distributed`` rounds also charge their target to the
    ``floor`` ledger."""
    target = privacy.user_event(cfg, cfg.privacy.noise_multiplier, state.global_arrays)
    mechanism = MECHANISMS.get(cfg.privacy.mechanism)
    mechanism.charge(state.privacy.ledger, state.privacy.floor, target, event, rnd, released)


def server_step(cfg: RunConfig, state: ServerState, delta: Arrays) -> Arrays:
    """Apply the round's server optimizer, restoring and saving its state in ``state``."""
    name = STRATEGIES.get(cfg.strategy.name).optimizer
    optimizer = make_optimizer(cfg.strategy)  # built from this round's hyper-parameters
    optimizer.load_state_dict(state.optimizer_states.get(name, {}))
    new = optimizer.step({k: state.global_arrays[k] for k in delta}, delta)
    if saved := optimizer.state_dict():
        state.optimizer_states[name] = saved
    return new
