"""The run's typed config, split by section, and the round plan on top of it.

Everything reads settings through :class:`RunConfig` (one frozen dataclass per section) or
:class:`Plan` (the base config plus per-round overrides); nothing else indexes Flower's run config.
"""

from fedtune.config.data import DataConfig
from fedtune.config.evaluation import EvalConfig
from fedtune.config.fields import Scalar, parse_assignments, parse_value, toml_scalar
from fedtune.config.model import PEFT_METHODS, LoraSection, ModelConfig, PeftSection
from fedtune.config.outputs import OutputConfig, SimulationConfig
from fedtune.config.plan import Plan, from_run_config
from fedtune.config.privacy import PrivacyConfig, SecaggConfig
from fedtune.config.run import SITE_KEYS, SITE_PRIVACY_KEYS, RunConfig, default_output_dir, flat_defaults
from fedtune.config.server import ServerConfig
from fedtune.config.strategy import StrategyConfig
from fedtune.config.traffic import CommunicationConfig, CompressionConfig
from fedtune.config.train import TrainConfig

__all__ = [
    "PEFT_METHODS",
    "SITE_KEYS",
    "SITE_PRIVACY_KEYS",
    "CommunicationConfig",
    "CompressionConfig",
    "DataConfig",
    "EvalConfig",
    "LoraSection",
    "ModelConfig",
    "OutputConfig",
    "PeftSection",
    "Plan",
    "PrivacyConfig",
    "RunConfig",
    "Scalar",
    "SecaggConfig",
    "ServerConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TrainConfig",
    "default_output_dir",
    "flat_defaults",
    "from_run_config",
    "parse_assignments",
    "parse_value",
    "toml_scalar",
]
