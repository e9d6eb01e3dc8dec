"""The whole run's config: one frozen dataclass per section, built from flat dotted keys.

The flat form (``lora.r = 8``) is what ``[tool.flwr.app.config]``, ``--run-config`` and
``fedtune simulate --set`` carry, and what the server sends to clients in each round's
ConfigRecord. :func:`RunConfig.from_flat` turns it into nested dataclasses, rejects unknown keys and
wrong types, and each section validates its values in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtune.config.baselines import check_baselines
from fedtune.config.data import DataConfig
from fedtune.config.evaluation import EvalConfig
from fedtune.config.fields import Scalar, attr_of, coerce, field_types, key_of, require
from fedtune.config.model import LoraSection, ModelConfig, PeftSection
from fedtune.config.outputs import OutputConfig, SimulationConfig
from fedtune.config.personalize import PersonalizeConfig
from fedtune.config.privacy import PrivacyConfig, SecaggConfig
from fedtune.config.report import ReportConfig
from fedtune.config.server import ServerConfig
from fedtune.config.strategy import StrategyConfig
from fedtune.config.traffic import CommunicationConfig, CompressionConfig
from fedtune.config.train import TrainConfig
from fedtune.core.errors import ConfigError

# Settings a data site may choose for itself in its node config; they override the server's round
# spec at that site (``lora.r`` sets the site's own rank, see ``simulation.site-ranks``). The privacy
# keys set a site's own DP-SGD noise or budget and apply under ``privacy.mechanism = dp-sgd`` only,
# where each site accounts for itself. ``simulation.site-delays`` is a test and benchmark knob: a site that
# sets it sleeps that many extra seconds per local step (a slow machine on purpose, see client/slowdown.py).
SITE_KEYS = (
    "model.name",
    "model.gguf-file",
    "model.dtype",
    "train.batch-size",
    "train.device",
    "train.num-threads",
    "model.quantization",
    "model.device-map",
    "train.precision",
    "train.gradient-checkpointing",
    "train.grad-accum-steps",
    "train.num-processes",
    "lora.r",
    "data.on-bad-record",
    "privacy.noise-multiplier",
    "privacy.target-epsilon",
    "simulation.site-delays",
)
SITE_PRIVACY_KEYS = ("privacy.noise-multiplier", "privacy.target-epsilon")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole run: top-level keys plus one section per component."""

    num_server_rounds: int = 3
    """Federated rounds."""
    seed: int = 0
    """Seeds the adapter init, client sampling, data order and partitioning."""
    baselines: str = ""
    """Comma-separated models ``fedtune simulate`` trains after the federated run, on the same data,
    base model, seed and held-out sets: ``local`` (each site alone), ``centralized`` (one model on
    the union of the sites' data); empty: none (``fedtune.simulations.baselines``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    peft: PeftSection = field(default_factory=PeftSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecaggConfig = field(default_factory=SecaggConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    communication: CommunicationConfig = field(default_factory=CommunicationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        # Rules across sections are the plan checker's (``fedtune.privacy.compat``); each section checks its own.
        require(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1.")
        check_baselines(self.baselines)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from flat dotted keys over the defaults; unknown keys and bad types raise."""
        known = flat_defaults()
        for key in flat:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                raise ConfigError(f"Unknown config key `{key}`.{hint}")
        nested: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            section, _, name = key.rpartition(".")
            ftype = field_types(_SECTIONS[section] if section else cls)[attr_of(name)]
            coerced = coerce(key, value, ftype)
            (nested.setdefault(section, {}) if section else top)[attr_of(name)] = coerced
        sections = {s: _SECTIONS[s](**kw) for s, kw in nested.items()}
        return cls(**top, **sections)

    def to_flat(self) -> dict[str, Scalar]:
        """The flat dotted form; ``from_flat(to_flat())`` round-trips."""
        out: dict[str, Scalar] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sf in dataclasses.fields(value):
                    out[f"{f.name}.{key_of(sf.name)}"] = getattr(value, sf.name)
            else:
                out[key_of(f.name)] = value
        return out

    def override(self, changes: Mapping[str, Any]) -> RunConfig:
        """A copy with flat ``changes`` applied (validated like ``from_flat``)."""
        return RunConfig.from_flat({**self.to_flat(), **changes})


_SECTIONS: dict[str, Any] = {
    name: hint for name, hint in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(hint)
}


def default_output_dir() -> str:
    """``runs/<timestamp>``: where a run goes when ``output.dir`` / ``--out`` is not given."""
    return time.strftime("runs/%Y%m%d-%H%M%S")


def flat_defaults() -> dict[str, Scalar]:
    """Every key with its default value."""
    return RunConfig().to_flat()
