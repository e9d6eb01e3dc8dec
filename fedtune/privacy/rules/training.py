"""Plan-checker rules for the strategy, the PEFT method and the run's own settings (one round's config each)."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.core.errors import ConfigError
from fedtune.model.methods import METHODS
from fedtune.strategies import STRATEGIES


def _strategy_known(cfg: RunConfig) -> list[str]:
    try:
        STRATEGIES.get(cfg.strategy.name)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _krum_quorum(cfg: RunConfig) -> list[str]:
    if cfg.strategy.name not in ("krum", "multi-krum"):
        return []
    need = cfg.strategy.krum_byzantine + 3
    if cfg.server.min_clients < need:
        return [
            f"`strategy.name` = {cfg.strategy.name} with `strategy.krum-byzantine` = "
            f"{cfg.strategy.krum_byzantine} needs `server.min-clients` >= {need}, "
            f"got {cfg.server.min_clients}."
        ]
    return []


def _trimmed_keeps_some(cfg: RunConfig) -> list[str]:
    if cfg.strategy.name == "trimmed-mean" and cfg.strategy.trim_fraction * cfg.server.min_clients < 1:
        return [
            f"`strategy.trim-fraction` = {cfg.strategy.trim_fraction} trims nothing with "
            f"`server.min-clients` = {cfg.server.min_clients}; raise one of them."
        ]
    return []


def _exact_vs_ffa(cfg: RunConfig) -> list[str]:
    if cfg.strategy.name == "exact" and cfg.lora.freeze_a and not cfg.lora.alternate:  # RoLoRA: its own rule
        return [
            "`strategy.name` = exact re-factorizes A, which `lora.freeze-a` keeps fixed; with FFA-LoRA "
            "plain fedavg is already exact."
        ]
    return []


def _hetero_ranks(cfg: RunConfig) -> list[str]:
    if not cfg.simulation.site_ranks:
        return []
    spec = STRATEGIES.get(cfg.strategy.name) if cfg.strategy.name in STRATEGIES else None
    if spec is not None and spec.individual_updates:
        return [
            f"`strategy.name` = {cfg.strategy.name} has no defined rule for heterogeneous ranks "
            "(`simulation.site-ranks`); use a fedavg-family strategy."
        ]
    return []


def _method_support(cfg: RunConfig) -> list[str]:
    """What each ``peft.method`` supports: LoRA-only rules and settings (DP-SGD: the mechanism's own rule)."""
    method = cfg.peft.method
    out = []
    if method != "lora":
        if cfg.strategy.name in STRATEGIES and STRATEGIES.get(cfg.strategy.name).lora_only:
            out.append(
                f"`strategy.name` = {cfg.strategy.name} is defined for LoRA adapters only, not `peft.method` = "
                f"{method}; use a fedavg-family or robust strategy."
            )
        if cfg.lora.freeze_a and not cfg.lora.alternate:
            out.append(f"`lora.freeze-a` (FFA-LoRA) needs `peft.method` = lora, got {method}.")
        if cfg.simulation.site_ranks:
            out.append(f"`simulation.site-ranks` (heterogeneous LoRA ranks) needs `peft.method` = lora, got {method}.")
    if not METHODS[method].peft and cfg.model.quantization != "none":
        out.append(
            f"`model.quantization` = {cfg.model.quantization} with `peft.method` = {method}: quantized base weights "
            "cannot be trained or saved as a model; use a PEFT method (QLoRA)."
        )
    return out


def _poisson_count(cfg: RunConfig) -> list[str]:
    if cfg.server.sampling == "poisson" and cfg.server.num_train:
        return [
            "`server.num-train` fixes the sample size, which `server.sampling` = poisson does not; "
            "use `server.fraction-train`."
        ]
    return []


def _site_ranks(cfg: RunConfig) -> list[str]:
    if all(r <= cfg.lora.r for r in cfg.simulation.ranks()):
        return []
    return [f"`simulation.site-ranks` must not exceed `lora.r` ({cfg.lora.r}), the rank of the global adapter."]


def _replies_quorum(cfg: RunConfig) -> list[str]:
    if cfg.server.min_replies <= cfg.server.min_clients:
        return []
    s = cfg.server
    return [f"`server.min-replies` ({s.min_replies}) must be <= `server.min-clients` ({s.min_clients})."]


def _accuracy_label(cfg: RunConfig) -> list[str]:
    if "accuracy" not in cfg.eval.metric_names() or cfg.data.label_field:
        return []
    return ["`eval.metrics` = accuracy needs `data.label-field`, the column holding each record's label or choice."]


def _ranks_vs_device_map(cfg: RunConfig) -> list[str]:
    if cfg.train.num_processes == 1 or not cfg.model.device_map:
        return []
    return [
        "`train.num-processes` must be 1 with `model.device-map` = auto (the model is split over the GPUs, "
        "not replicated)."
    ]


RULES = [
    _strategy_known,
    _krum_quorum,
    _trimmed_keeps_some,
    _exact_vs_ffa,
    _hetero_ranks,
    _method_support,
    _poisson_count,
    _site_ranks,
    _replies_quorum,
    _accuracy_label,
    _ranks_vs_device_map,
]
