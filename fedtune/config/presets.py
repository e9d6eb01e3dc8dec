"""Named starting configs (``--preset``): flat overrides of the defaults, for simulate, server and client."""

from __future__ import annotations

from fedtune.config import Scalar
from fedtune.core.errors import ConfigError

PRESETS: dict[str, dict[str, Scalar]] = {
    # A 2-layer Llama built from a config in seconds; what tests and quick tries use.
    "tiny": {
        "num-server-rounds": 2,
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.0,
        "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "data.partitioner": "dirichlet",
        "data.max-seq-len": 96,
        "data.max-eval-examples": 32,
        "train.local-steps": 4,
        "train.batch-size": 8,
        "train.lr": 2e-2,
        "eval.max-new-tokens": 16,
        "simulation.num-supernodes": 3,
    },
    # The demo: SmolLM2-135M-Instruct, one simulated site per hospital in the demo data (the
    # defaults of fedtune/config.py, which [tool.flwr.app.config] mirrors), plus task metrics on
    # answers generated for 4 held-out prompts per evaluation, in round 0 (the base model) and the
    # last round only (generation is slow on a CPU; the rounds between evaluate the loss), the sites'
    # own evaluation in the last round only (the server's held-out set every round), and bf16
    # autocast in training where the CPU or GPU computes bf16 in hardware (fp32 elsewhere, and under DP-SGD).
    "smollm2": {
        "eval.federated-every": 0,
        "eval.metrics": "loss,exact-match,f1,rouge-l",
        "eval.max-generate": 4,
        "eval.task-metrics-every": 0,
        "train.precision": "auto",
    },
}


def preset(name: str) -> dict[str, Scalar]:
    """The flat overrides of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"`--preset` must be one of {', '.join(PRESETS)}; got {name!r}.")
    return dict(PRESETS[name])


PRESET_SITES = {"tiny": 3, "smollm2": 5}  # sites the built-in demo data is split into
