"""``privacy.mechanism = dp-sgd``: sample-level DP at each site (Opacus DP-SGD, Abadi et al. 2016,
https://arxiv.org/abs/1607.00133); each site keeps its own ledger and reports its epsilon.

The DP trainer itself is client code (``fedtune.client.dp_trainer``): the site picks it by
:attr:`Mechanism.site_ledger`.
"""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.model.methods import METHODS
from fedtune.privacy.mechanisms.base import Mechanism, noise_source
from fedtune.strategies import STRATEGIES


class DPSGD(Mechanism):
    """Per-example clipping and noise in each local step; the server records the largest site epsilon."""

    name = "dp-sgd"
    unit = "sample-level: one training example at one site, per site"
    trust = (
        "each site clips and noises its own training steps (Opacus): the guarantee holds for each "
        "training example against the server too"
    )
    site_ledger = True

    def problems(self, cfg: RunConfig) -> list[str]:
        out = noise_source(cfg)
        method = cfg.peft.method
        if why := METHODS[method].no_dp_sgd:
            able = ", ".join(name for name, spec in METHODS.items() if not spec.no_dp_sgd)
            out.append(
                f"`privacy.mechanism` = dp-sgd with `peft.method` = {method}: {why}; use one of {able}, or "
                "`privacy.mechanism` = central / local."
            )
        if cfg.strategy.name in STRATEGIES and STRATEGIES.get(cfg.strategy.name).proximal:
            out.append(
                "`strategy.name` = fedprox with `privacy.mechanism` = dp-sgd: the proximal term's gradient bypasses "
                "per-example clipping; use fedavg."
            )
        t = cfg.train
        for key, ok in (
            ("train.num-processes", t.num_processes == 1),
            ("train.gradient-checkpointing", not t.gradient_checkpointing),
            ("train.precision", t.precision in ("fp32", "auto")),  # auto: DP-SGD never autocasts
        ):
            if not ok:
                out.append(
                    f"`{key}` is not supported with `privacy.mechanism` = dp-sgd (Opacus's per-example gradients "
                    "here need one process and stored fp32 activations); use its default."
                )
        return out
