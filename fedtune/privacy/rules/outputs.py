"""Plan-checker rules for what a run must write so that its outputs can be used: the baselines
(``baselines``) need each site's number of training steps from the run's records."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.config.baselines import parse_baselines
from fedtune.config.plan import Plan
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.privacy.rounds import participants_hidden


def _every_site(cfg: RunConfig) -> bool:
    """Whether every site trains in a round of ``cfg`` (fixed-size sampling of all, and no site can
    decline for a spent budget)."""
    n = cfg.simulation.num_supernodes
    full = cfg.server.fraction_train >= 1 and (not cfg.server.num_train or cfg.server.num_train >= n)
    return cfg.server.sampling == "fixed" and full and not MECHANISMS.get(cfg.privacy.mechanism).site_ledger


def _baselines_count_steps(plan: Plan) -> list[str]:
    """The local-only baselines train each site for the steps it trained in the run: the outputs must say."""
    cfg = plan.base
    if not parse_baselines(cfg.baselines):
        return []
    out = []
    if participants_hidden(plan):
        out.append(
            "`baselines` needs each site's number of training rounds, which a run claiming amplification by "
            "client sampling keeps secret; set `output.log-participants` = true or drop `baselines`."
        )
    if cfg.simulation.backend == "ray" and not all(_every_site(c) for c in plan.configs()):
        out.append(
            "`baselines` with `simulation.backend` = ray needs every site sampled every round (Ray's node ids "
            "do not say which site is which); use `simulation.backend` = shared."
        )
    return out


PLAN_RULES = [_baselines_count_steps]
