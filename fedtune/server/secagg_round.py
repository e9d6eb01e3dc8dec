"""One SecAgg+ round on the Message API (``secagg.protocol = secagg``): the server learns only the sum.

Bell et al. 2020 (https://eprint.iacr.org/2020/704), Algorithm 2, as four message exchanges with the
sampled clients, each under a timeout; the pure stage functions live in ``fedtune.privacy.secagg``:

1. ``query.secagg_keys``: each client advertises two fresh public keys, its number of examples and its
   LoRA rank (all public); the answering clients are U1, and the masking graph is laid over them;
2. ``query.secagg_share``: each client gets its neighbours' public keys and answers one ciphertext per
   neighbour (its Shamir shares); the answering clients are U2;
3. ``train.secagg``: each client in U2 gets the global adapter, the round spec, the ciphertexts
   addressed to it and its weight alpha_i = w_i / max_j w_j (w: examples or 1); it trains and answers
   alpha_i * delta_i, zero-padded to the global rank, flat, quantized and masked; the answering clients
   are U3, and only the running sum of their vectors is kept;
4. ``query.secagg_unmask``: each client in U3 learns U3 and U2 - U3 and answers seed shares of U3 and
   key shares of U2 - U3; the server removes the masks, dequantizes and divides by sum alpha_i (per
   entry, over the sites whose rank covers it), then takes the strategy's server step. That division
   shows each rank band's sum on its own, so under mixed ranks the round is abandoned before this stage
   (and before stage 3) when some band is trained by fewer than t of the sites (``covered``).

Under ``privacy.mechanism = distributed`` stage 3 answers the clipped delta as integers plus a Skellam
noise share (``fedtune.privacy.distributed``) in a modulus wide enough for the noise; the server decodes
the signed sum, divides it by the expected number of clients and records the noise the survivors added.

A round that cannot finish (too few clients at some stage, a corrupt share) is abandoned: nothing is
released and the global adapter stays as it was; the round's record says why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fedtune.config import RunConfig
from fedtune.core.errors import ConfigError
from fedtune.privacy.secagg import settings
from fedtune.privacy.secagg.errors import SecAggError
from fedtune.privacy.skellam import SkellamEvent
from fedtune.server.bookkeeping import account_round
from fedtune.server.participants import scrub
from fedtune.server.record import Failure, RoundRecord, SecAggInfo
from fedtune.server.secagg_exchanges import Exchanges
from fedtune.server.secagg_stages import Stages
from fedtune.server.state import GridLike, ServerState

log = logging.getLogger(__name__)


def secagg_round(
    cfg: RunConfig,
    grid: GridLike,
    state: ServerState,
    rnd: int,
    nodes: list[int],
    record: RoundRecord,
    extra: Mapping[str, int | str],
    denominator: float,
) -> None:
    """Run one SecAgg+ round with ``nodes``; update ``state.global_arrays`` unless it is abandoned; fill
    ``record`` as ``plain_round.train_round`` does, plus ``record.secagg`` (parameters, survivors, per-stage bytes
    and seconds).

    ``denominator`` is what ``central`` and ``distributed`` DP divide the noised sum by (the expected number
    of clients). Under ``distributed`` the round is charged the noise its survivors' shares really add up to
    (``record.secagg.distributed``); an abandoned round is charged its target noise.
    """
    ex = Exchanges(grid, rnd, hide=frozenset(nodes) if state.hidden else None)
    info = SecAggInfo(stages=ex.stages)
    exhausted: list[int] = []
    survivors: list[int] = []
    try:
        survivors = _protocol(cfg, ex, state, rnd, nodes, extra, denominator, info, exhausted)
        updated = True
    except (SecAggError, ConfigError) as exc:
        info.abandoned = str(exc)
        reason = scrub(str(exc), ex.hide)
        log.warning("round %d: secure aggregation abandoned, global adapter unchanged: %s", rnd, reason)
        updated = False
    info.dropped = sorted(set(nodes) - set(survivors))
    dp = info.distributed
    released = SkellamEvent(dp.l1, dp.l2, dp.mu_released, 1) if updated and dp else None
    account_round(cfg, state, rnd, released=updated, event=released)
    record.failures = [Failure(n, r) for n, r in sorted(ex.failures.items())]
    record.replied, record.failed = len(survivors), len(record.failures)
    record.bytes_up = sum(s["bytes_up"] for s in ex.stages.values())
    record.bytes_down = sum(s["bytes_down"] for s in ex.stages.values())
    record.replied_nodes = survivors
    record.train_loss = None  # no site reports a loss under secure aggregation
    record.updated, record.secagg = updated, info
    if exhausted:
        record.budget_exhausted_nodes = sorted(exhausted)


def _protocol(
    cfg: RunConfig,
    ex: Exchanges,
    state: ServerState,
    rnd: int,
    nodes: list[int],
    extra: Mapping[str, int | str],
    denominator: float,
    info: SecAggInfo,
    exhausted: list[int],
) -> list[int]:
    """The four stages; returns U3 (whose inputs are in the applied sum) or raises to abandon the round."""
    settings.resolve(cfg, len(nodes))  # refuse before talking to anyone
    run = Stages(cfg, ex, state, rnd, extra, info)
    run.advertise(nodes)
    run.share()
    total = run.train(exhausted)
    run.unmask(total, denominator)
    return run.u3
