"""Typed run config: flat dotted kebab-case keys <-> frozen dataclasses; the only run_config reader.

The flat form (``lora.r = 8``) is what ``[tool.flwr.app.config]``, ``--run-config`` and
``fedtune simulate --set`` carry, and what the server sends to clients in each round's
ConfigRecord. :func:`RunConfig.from_flat` turns it into nested dataclasses, rejects unknown keys and
wrong types, and each section validates its values in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import time
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fedtune.errors import ConfigError
from fedtune.task_metrics import KNOWN, parse_names

if TYPE_CHECKING:
    from fedtune.strategies.plan import Plan

Scalar = bool | int | float | str

# Settings a data site may choose for itself in its node config; they override the server's round
# spec at that site (``lora.r`` sets the site's own rank, see ``simulation.site-ranks``). The privacy
# keys set a site's own DP-SGD noise or budget and apply under ``privacy.mechanism = dp-sgd`` only,
# where each site accounts for itself.
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
)
SITE_PRIVACY_KEYS = ("privacy.noise-multiplier", "privacy.target-epsilon")


def _require(ok: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"`{key}` {msg}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """``model.*``: the base model."""

    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """Hugging Face causal-LM id or local directory."""
    gguf_file: str = ""
    """Optional GGUF file inside ``model.name`` (dequantized once, then cached)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights dtype; ``auto`` is bfloat16 on CUDA and float32 on CPU."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load the frozen base quantized by bitsandbytes (QLoRA: NF4 for ``4bit``, Dettmers et al. 2023,
    https://arxiv.org/abs/2305.14314) and prepare it with PEFT's ``prepare_model_for_kbit_training``;
    needs CUDA and the ``gpu`` extra. The adapter stays in float32."""
    device_map: Literal["", "auto"] = ""
    """``auto`` spreads a base model too large for one GPU over all of the site's GPUs (accelerate's
    ``device_map="auto"``); empty puts it on ``train.device``."""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model.name", "must not be empty.")


@dataclass(frozen=True, kw_only=True)
class LoraSection:
    """``lora.*``: the LoRA adapter (PEFT ``LoraConfig``)."""

    r: int = 8
    """Rank of the update matrices."""
    alpha: int = 16
    """Scaling numerator; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    """Comma-separated module names, or ``all-linear``."""
    freeze_a: bool = False
    """FFA-LoRA (Sun et al., ICLR 2024): A stays at its seeded init, only B is trained and sent."""

    def __post_init__(self) -> None:
        _require(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}.")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}.")
        _require(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}.")
        _require(bool(self.modules()), "lora.target-modules", "must name at least one module.")

    def modules(self) -> list[str] | str:
        """Target modules in the form PEFT expects."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


PEFT_METHODS = ("lora", "ia3", "prompt-tuning", "prefix-tuning", "bitfit", "full")


@dataclass(frozen=True, kw_only=True)
class PeftSection:
    """``peft.*``: which parameters a site trains and sends (see README, "PEFT methods")."""

    method: Literal["lora", "ia3", "prompt-tuning", "prefix-tuning", "bitfit", "full"] = "lora"
    """``lora`` (``lora.*``), ``ia3``, ``prompt-tuning``, ``prefix-tuning`` (PEFT's own configs),
    ``bitfit`` (only the base model's bias parameters) or ``full`` (every parameter, no PEFT)."""
    full_max_params: int = 200_000_000
    """``full`` is refused for a model with more parameters than this (every round moves all of
    them, 4 bytes each, to and from every site)."""
    num_virtual_tokens: int = 16
    """Virtual tokens of ``prompt-tuning`` and ``prefix-tuning``."""
    ia3_target_modules: str = ""
    """Comma-separated modules ``ia3`` rescales; empty: PEFT's default for the architecture
    (k_proj, v_proj, down_proj for Llama)."""
    ia3_feedforward_modules: str = ""
    """The subset of ``peft.ia3-target-modules`` that are feed-forward (their input is rescaled);
    empty: PEFT's default for the architecture."""

    def __post_init__(self) -> None:
        _require(self.full_max_params >= 1, "peft.full-max-params", f"must be >= 1, got {self.full_max_params}.")
        _require(
            self.num_virtual_tokens >= 1, "peft.num-virtual-tokens", f"must be >= 1, got {self.num_virtual_tokens}."
        )

    def ia3_modules(self) -> tuple[list[str] | None, list[str] | None]:
        """IA3's target and feed-forward modules as PEFT expects them (None: PEFT's default)."""

        def split(text: str) -> list[str] | None:
            return [m.strip() for m in text.split(",") if m.strip()] or None

        return split(self.ia3_target_modules), split(self.ia3_feedforward_modules)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """``data.*``: where the instruction data comes from and how it becomes token batches."""

    path: str = ""
    """JSONL/CSV/Parquet file or Hugging Face dataset name; empty means the built-in demo set."""
    eval_path: str = ""
    """Server-side held-out file for centralized eval; empty uses the demo test set with the demo
    data, and disables centralized eval otherwise."""
    format: Literal["alpaca", "chat"] = "chat"
    """Prompt format: Alpaca-style text, or the tokenizer's chat template."""
    instruction_field: str = "instruction"
    """Column holding the instruction."""
    input_field: str = "input"
    """Optional column holding extra input (may be absent)."""
    output_field: str = "output"
    """Column holding the response; the loss covers these tokens only."""
    partitioner: Literal["iid", "dirichlet", "natural"] = "natural"
    """How a simulation splits ``data.path`` across sites (flwr-datasets partitioners)."""
    partition_by: str = "site"
    """Column used by the ``natural`` and ``dirichlet`` partitioners."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet partitioner; smaller is more skewed."""
    eval_fraction: float = 0.2
    """Share of each site's rows kept back for federated evaluation."""
    max_seq_len: int = 128
    """Tokens per example after truncation."""
    max_eval_examples: int = 16
    """Cap on the examples any one evaluation uses."""
    label_field: str = ""
    """Column holding each record's label or choice (a class name, a letter), which the
    ``accuracy`` metric compares the generated answer with; empty: no labels."""
    on_bad_record: Literal["skip", "fail"] = "skip"
    """What a site does with malformed or empty records: ``skip`` drops them and says how many,
    ``fail`` refuses the data with the file, line and problem (never the content)."""

    def __post_init__(self) -> None:
        _require(
            0 < self.eval_fraction < 1,
            "data.eval-fraction",
            f"must be in (0, 1), got {self.eval_fraction}.",
        )
        _require(self.max_seq_len >= 8, "data.max-seq-len", f"must be >= 8, got {self.max_seq_len}.")
        _require(
            self.dirichlet_alpha > 0,
            "data.dirichlet-alpha",
            f"must be > 0, got {self.dirichlet_alpha}.",
        )
        _require(
            self.max_eval_examples >= 1,
            "data.max-eval-examples",
            f"must be >= 1, got {self.max_eval_examples}.",
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """``train.*``: local training at each site."""

    local_steps: int = 3
    """Optimizer steps per round at each site."""
    batch_size: int = 4
    """Examples per micro-batch, for the whole site (split over ``train.num-processes``); an
    optimizer step takes ``train.grad-accum-steps`` micro-batches (DP-SGD: their total is the expected
    Poisson batch)."""
    lr: float = 2e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping of the batch gradient (not DP); 0 turns it off."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where a site trains; ``auto`` uses CUDA when present."""
    num_threads: int = 0
    """torch CPU threads per client process; 0 keeps torch's default."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the forward pass: ``bf16`` (CUDA or CPU), ``fp16`` (CUDA only, with a
    gradient scaler) or ``fp32`` (none). Adapter weights and optimizer state stay float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (less memory, more time)."""
    grad_accum_steps: int = 1
    """Micro-batches of ``train.batch-size`` per optimizer step: the effective batch is
    batch-size x grad-accum-steps, and the update equals one step on that batch. Under dp-sgd the
    expected Poisson batch is that effective batch, processed in this many chunks (virtual steps)."""
    num_processes: int = 1
    """Data-parallel processes at the site (one per GPU; gloo on CPU): each takes a disjoint shard of
    every micro-batch and gradients are all-reduced, so the update equals the 1-process one."""

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, "train.local-steps", f"must be >= 1, got {self.local_steps}.")
        _require(self.batch_size >= 1, "train.batch-size", f"must be >= 1, got {self.batch_size}.")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}.")
        _require(self.max_grad_norm >= 0, "train.max-grad-norm", "must be >= 0.")
        _require(self.num_threads >= 0, "train.num-threads", "must be >= 0.")
        _require(self.grad_accum_steps >= 1, "train.grad-accum-steps", f"must be >= 1, got {self.grad_accum_steps}.")
        _require(self.num_processes >= 1, "train.num-processes", f"must be >= 1, got {self.num_processes}.")
        _require(
            self.num_processes <= self.batch_size,
            "train.num-processes",
            f"({self.num_processes}) must be <= `train.batch-size` ({self.batch_size}): each process takes a "
            "shard of every micro-batch.",
        )


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """``strategy.*``: how the server combines client deltas and steps the global adapter."""

    name: str = "fedavg"
    """Aggregation rule (see ``fedtune.strategies``)."""
    server_lr: float = 1.0
    """Server learning rate applied to the aggregated delta (the pseudo-gradient's step size)."""
    weighting: Literal["examples", "uniform"] = "examples"
    """Weight each client by its number of training examples, or equally."""
    sum_dtype: Literal["float64", "float32"] = "float64"
    """Dtype of the running sum of deltas: float64 gives the same result whatever order replies
    arrive in (reproducible runs and resumes); float32 is faster for very large federations."""
    momentum: float = 0.9
    """Server momentum of ``fedavgm``."""
    beta1: float = 0.9
    """First-moment decay of ``fedadam`` / ``fedyogi``."""
    beta2: float = 0.99
    """Second-moment decay of ``fedadam`` / ``fedyogi``."""
    tau: float = 1e-3
    """Adaptivity (epsilon) of ``fedadam`` / ``fedyogi`` / ``fedadagrad``."""
    proximal_mu: float = 0.01
    """Proximal coefficient of ``fedprox``: clients add mu/2 * ||w - w_global||^2 to their loss."""
    trim_fraction: float = 0.1
    """Share of the largest and of the smallest values ``trimmed-mean`` drops per coordinate."""
    krum_byzantine: int = 1
    """Number of poisoned clients ``krum`` / ``multi-krum`` tolerate (f)."""
    multi_krum_select: int = 0
    """Updates ``multi-krum`` averages; 0 means n - f."""

    def __post_init__(self) -> None:
        _require(self.server_lr > 0, "strategy.server-lr", f"must be > 0, got {self.server_lr}.")
        _require(0 <= self.momentum < 1, "strategy.momentum", f"must be in [0, 1), got {self.momentum}.")
        _require(0 <= self.beta1 < 1, "strategy.beta1", f"must be in [0, 1), got {self.beta1}.")
        _require(0 <= self.beta2 < 1, "strategy.beta2", f"must be in [0, 1), got {self.beta2}.")
        _require(self.tau > 0, "strategy.tau", f"must be > 0, got {self.tau}.")
        _require(self.proximal_mu >= 0, "strategy.proximal-mu", "must be >= 0.")
        _require(
            0 <= self.trim_fraction < 0.5,
            "strategy.trim-fraction",
            f"must be in [0, 0.5), got {self.trim_fraction}.",
        )
        _require(self.krum_byzantine >= 0, "strategy.krum-byzantine", "must be >= 0.")
        _require(self.multi_krum_select >= 0, "strategy.multi-krum-select", "must be >= 0.")


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """``privacy.*``: differential privacy (see README, "Privacy")."""

    mechanism: Literal["none", "dp-sgd", "central", "local", "distributed"] = "none"
    """``none`` (no formal guarantee), ``dp-sgd`` (sample-level, Opacus at each site), ``central``
    (user-level DP-FedAvg: clip, noise on the sum at a trusted server), ``local`` (each client
    clips and noises its own delta) or ``distributed`` (each client adds a Skellam noise share
    inside SecAgg+, so the server sees only the noised sum)."""
    target_epsilon: float = 0.0
    """The budget: per site for ``dp-sgd``, for the federation otherwise; 0 means no budget."""
    delta: float = 1e-5
    """The delta every epsilon is reported at."""
    noise_multiplier: float = -1.0
    """Gaussian noise std in units of the clip norm; -1 solves it from ``privacy.target-epsilon``
    for the planned rounds."""
    clip_norm: float = 1.0
    """C: per-example gradient clip (``dp-sgd``) or per-client delta clip (``central``, ``local``,
    ``distributed``);
    the starting value under adaptive clipping."""
    clip_on: Literal["client", "server"] = "client"
    """Where ``central`` clips deltas: at the client (the server checks the norm) or at the server."""
    adaptive_clip: bool = False
    """``central``: adapt C towards a quantile of the update norms (Andrew et al. 2021)."""
    target_quantile: float = 0.5
    """Adaptive clipping: the share of client updates that should fall under C."""
    clip_lr: float = 0.2
    """Adaptive clipping: the geometric step size of C."""
    clip_count_stddev: float = 0.0
    """Adaptive clipping: noise std on the count of updates under C (each counted as +-1/2, so one
    client moves it by 1/2); must exceed half of ``privacy.noise-multiplier``. 0 means expected
    clients / 20 or the noise multiplier, whichever is larger."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus accountant that turns the privacy events into epsilon."""

    def __post_init__(self) -> None:
        _require(self.target_epsilon >= 0, "privacy.target-epsilon", "must be >= 0 (0 means no budget).")
        _require(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}.")
        _require(
            self.noise_multiplier == -1 or self.noise_multiplier >= 0,
            "privacy.noise-multiplier",
            f"must be >= 0, or -1 to solve it from `privacy.target-epsilon`; got {self.noise_multiplier}.",
        )
        _require(self.clip_norm > 0, "privacy.clip-norm", f"must be > 0, got {self.clip_norm}.")
        _require(0 < self.target_quantile < 1, "privacy.target-quantile", "must be in (0, 1).")
        _require(self.clip_lr > 0, "privacy.clip-lr", "must be > 0.")
        _require(self.clip_count_stddev >= 0, "privacy.clip-count-stddev", "must be >= 0.")


@dataclass(frozen=True, kw_only=True)
class SecaggConfig:
    """``secagg.*``: secure aggregation."""

    protocol: Literal["none", "secagg"] = "none"
    """``none`` sends updates in the clear; ``secagg`` runs SecAgg+ (Bell et al. 2020): the server
    learns only the (weighted) sum of the round's deltas."""
    degree: int = 0
    """Neighbours each client masks with; 0 = auto: the complete graph for up to 16 clients, else an
    even k = 2 * ceil(2 log2 N), O(log N) as Bell et al. suggest. An explicit value must be even."""
    threshold: int = 0
    """Shares needed to rebuild a client's secrets; 0 = a strict majority of its degree + 1 holders."""
    quant_bits: int = 16
    """Fixed-point bits per value; the modulus is 2^(bits + ceil(log2 N)) and must fit 32 bits. Under
    ``privacy.mechanism = distributed`` the clip norm C maps to 2^(bits - 1) integer units and the
    modulus also holds the noise shares."""
    clip: float = 0.0
    """Per-coordinate quantization range [-clip, clip]; 0 = auto: the most an AdamW coordinate can move
    in the round, 3.17 * `train.local-steps` * `train.lr` (plus 4 noise std under `local` DP)."""
    stage_timeout: float = 300.0
    """Seconds each key/share/unmask stage waits for replies (the training stage waits
    `server.round-timeout`)."""

    def __post_init__(self) -> None:
        _require(
            self.degree == 0 or (self.degree >= 2 and self.degree % 2 == 0),
            "secagg.degree",
            f"must be 0 (auto) or an even number >= 2 (no odd-degree regular graph on an odd number of clients "
            f"exists), got {self.degree}.",
        )
        _require(self.threshold >= 0, "secagg.threshold", f"must be >= 0 (0 = auto), got {self.threshold}.")
        _require(1 <= self.quant_bits <= 31, "secagg.quant-bits", f"must be in 1..31, got {self.quant_bits}.")
        _require(
            math.isfinite(self.clip) and self.clip >= 0,
            "secagg.clip",
            f"must be a finite number >= 0 (0 = auto), got {self.clip}.",
        )
        _require(self.stage_timeout > 0, "secagg.stage-timeout", f"must be > 0, got {self.stage_timeout}.")


@dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    """``compression.*``: how updates travel (see README, "Compression and communication budget")."""

    uplink: Literal["none", "float32", "int16", "int8", "int4", "topk"] = "none"
    """Client -> server delta: ``none`` (float32, one array per PEFT key), ``float32`` (lossless, packed
    into one array), ``int16`` / ``int8`` / ``int4`` (blockwise absmax scale, stochastic rounding), or
    ``topk`` (the largest ``compression.topk-fraction`` of each array, error feedback at the client)."""
    downlink: Literal["none", "float32", "int16", "int8"] = "none"
    """Server -> client global adapter; when quantized, the dequantized adapter becomes the global
    one, so the server and every client hold exactly the same values."""
    block_size: int = 256
    """Values per quantization block (one float32 scale each): int8 costs 1 + 4 / block bytes a value."""
    topk_fraction: float = 0.1
    """Share of each array's entries ``topk`` sends (at least one)."""

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "compression.block-size", f"must be >= 1, got {self.block_size}.")
        _require(
            0 < self.topk_fraction <= 1,
            "compression.topk-fraction",
            f"must be in (0, 1], got {self.topk_fraction}.",
        )


@dataclass(frozen=True, kw_only=True)
class CommunicationConfig:
    """``communication.*``: the run's traffic budget (FlowerTune's rule, enforced)."""

    budget_mb: float = 0.0
    """Most bytes (in MB, 10^6 bytes) up plus down the whole run may move; the server stops before a
    round that would pass it. 0 means no budget."""

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.budget_mb) and self.budget_mb >= 0,
            "communication.budget-mb",
            f"must be >= 0 (0 = no budget), got {self.budget_mb}.",
        )


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """``server.*``: client sampling, timeouts and reply validation."""

    fraction_train: float = 1.0
    """Share of the connected clients sampled each round."""
    num_train: int = 0
    """Clients sampled each round; 0 uses ``server.fraction-train`` instead."""
    sampling: Literal["fixed", "poisson"] = "fixed"
    """``fixed``: a seeded choice of that many clients. ``poisson``: each connected client joins
    independently with probability ``server.fraction-train`` (what DP amplification assumes)."""
    min_clients: int = 2
    """Clients that must be connected (and sampled) before a round starts."""
    min_replies: int = 1
    """Valid replies needed to update the global adapter; fewer leaves it unchanged."""
    round_timeout: float = 600.0
    """Seconds to wait for replies in a round."""
    wait_for_clients: float = 300.0
    """Seconds to wait for ``server.min-clients`` clients to connect."""
    max_update_norm: float = 0.0
    """Replies whose delta has a larger L2 norm are rejected; 0 turns the check off."""

    def __post_init__(self) -> None:
        _require(
            0 < self.fraction_train <= 1,
            "server.fraction-train",
            f"must be in (0, 1], got {self.fraction_train}.",
        )
        _require(self.min_clients >= 1, "server.min-clients", "must be >= 1.")
        _require(self.num_train >= 0, "server.num-train", "must be >= 0.")
        _require(self.min_replies >= 1, "server.min-replies", "must be >= 1.")
        _require(self.round_timeout > 0, "server.round-timeout", "must be > 0.")
        _require(self.max_update_norm >= 0, "server.max-update-norm", "must be >= 0.")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """``eval.*``: evaluation."""

    federated: bool | Literal["auto"] = "auto"
    """Evaluate the global adapter on each site's held-out split every round. ``auto``: on without DP,
    off under a DP mechanism (whose guarantee does not cover the per-site metrics it reports);
    ``true`` turns it on under DP too, and the run's trust statement then says they are not covered."""

    def federated_on(self, dp: bool) -> bool:
        """``eval.federated``'s effective value in a run with (``dp``) or without a DP mechanism."""
        return (not dp) if self.federated == "auto" else bool(self.federated)

    centralized: bool = True
    """Evaluate the global adapter on the server's held-out set every round."""
    batch_size: int = 8
    """Examples per evaluation batch."""
    max_new_tokens: int = 48
    """Tokens generated per answer (task metrics and the base-vs-fine-tuned sample answer)."""
    metrics: str = "loss"
    """Comma-separated metrics each evaluation computes: ``loss`` (held-out loss per response
    token), and on generated answers ``exact-match``, ``f1``, ``rouge-l``, ``accuracy`` (needs
    ``data.label-field``). Generation is slow: see ``eval.max-generate``."""
    max_generate: int = 8
    """Held-out examples each evaluation (each site's, and the server's) generates answers for."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "eval.batch-size", "must be >= 1.")
        _require(self.max_new_tokens >= 1, "eval.max-new-tokens", "must be >= 1.")
        _require(self.max_generate >= 1, "eval.max-generate", f"must be >= 1, got {self.max_generate}.")
        unknown = [n for n in parse_names(self.metrics) if n not in KNOWN]
        _require(
            not unknown,
            "eval.metrics",
            f"has unknown metric(s) {', '.join(map(repr, unknown))}; known: {', '.join(KNOWN)}.",
        )

    def metric_names(self) -> list[str]:
        """The names in ``eval.metrics``, in order."""
        return parse_names(self.metrics)


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """``simulation.*``: the local federation (Flower's simulation engine, Ray backend)."""

    backend: Literal["ray", "shared"] = "ray"
    """``ray``: Flower's simulation engine, one process per client; ``shared``: every site in this
    process, in turn, on one resident base model (many sites, little memory)."""
    num_supernodes: int = 5
    """Simulated data sites."""
    num_cpus: int = 1
    """CPUs per simulated client (Flower's default of 2 runs one client at a time on 2 cores)."""
    num_gpus: float = 0.0
    """GPUs per simulated client; fractions share a GPU."""
    site_ranks: str = ""
    """Comma-separated LoRA rank per simulated site (cycled), e.g. ``16,8,4``; empty: all ``lora.r``."""

    def __post_init__(self) -> None:
        _require(self.num_supernodes >= 1, "simulation.num-supernodes", "must be >= 1.")
        _require(self.num_cpus >= 1, "simulation.num-cpus", "must be >= 1.")
        _require(self.num_gpus >= 0, "simulation.num-gpus", "must be >= 0.")
        _require(
            all(p.strip().isdigit() and int(p) >= 1 for p in self.site_ranks.split(",")) if self.site_ranks else True,
            "simulation.site-ranks",
            f"must be comma-separated ranks >= 1, got {self.site_ranks!r}.",
        )

    def ranks(self) -> list[int]:
        """The per-site ranks, empty when every site uses ``lora.r``."""
        return [int(p) for p in self.site_ranks.split(",")] if self.site_ranks else []


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """``output.*``: where results go."""

    dir: str = ""
    """Run directory; empty means ``runs/<timestamp>``."""
    resume: bool = False
    """Continue the run in ``output.dir`` from its last complete checkpoint."""
    log_participants: bool = False
    """Write the sampled and replying node ids (and each node's failures, bytes and rank) to the
    outputs and the log when the accountant claims amplification by client sampling
    (``privacy.mechanism = central`` with ``server.sampling = poisson``). Off by default, because
    amplification assumes nobody outside the server knows who was sampled; when on, the guarantee
    then assumes these outputs stay secret from the adversary. Without such a claim ids are always
    written."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole run: top-level keys plus one section per component."""

    num_server_rounds: int = 3
    """Federated rounds."""
    seed: int = 0
    """Seeds the adapter init, client sampling, data order and partitioning."""
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
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        _require(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1.")
        _require(
            all(r <= self.lora.r for r in self.simulation.ranks()),
            "simulation.site-ranks",
            f"must not exceed `lora.r` ({self.lora.r}), the rank of the global adapter.",
        )
        _require(
            self.server.min_replies <= self.server.min_clients,
            "server.min-replies",
            f"({self.server.min_replies}) must be <= `server.min-clients` ({self.server.min_clients}).",
        )
        _require(
            "accuracy" not in self.eval.metric_names() or bool(self.data.label_field),
            "eval.metrics",
            "= accuracy needs `data.label-field`, the column holding each record's label or choice.",
        )
        _require(
            self.train.num_processes == 1 or not self.model.device_map,
            "train.num-processes",
            "must be 1 with `model.device-map` = auto (the model is split over the GPUs, not replicated).",
        )
        if self.privacy.mechanism == "dp-sgd":
            for key, ok in (
                ("train.num-processes", self.train.num_processes == 1),
                ("train.gradient-checkpointing", not self.train.gradient_checkpointing),
                ("train.precision", self.train.precision == "fp32"),
            ):
                _require(
                    ok,
                    key,
                    "is not supported with `privacy.mechanism` = dp-sgd (Opacus's per-example "
                    "gradients here need one process and stored fp32 activations); use its default.",
                )

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
            ftype = _field_types(_SECTIONS[section] if section else cls)[_attr(name)]
            coerced = _coerce(key, value, ftype)
            (nested.setdefault(section, {}) if section else top)[_attr(name)] = coerced
        sections = {s: _SECTIONS[s](**kw) for s, kw in nested.items()}
        return cls(**top, **sections)

    def to_flat(self) -> dict[str, Scalar]:
        """The flat dotted form; ``from_flat(to_flat())`` round-trips."""
        out: dict[str, Scalar] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sf in dataclasses.fields(value):
                    out[f"{f.name}.{_key(sf.name)}"] = getattr(value, sf.name)
            else:
                out[_key(f.name)] = value
        return out

    def override(self, changes: Mapping[str, Any]) -> RunConfig:
        """A copy with flat ``changes`` applied (validated like ``from_flat``)."""
        return RunConfig.from_flat({**self.to_flat(), **changes})


_SECTIONS: dict[str, Any] = {
    name: hint for name, hint in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(hint)
}


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _attr(key: str) -> str:
    return key.replace("-", "_")


_HINTS: dict[str, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    # get_type_hints re-evaluates every annotation string (slow); from_flat asks once per key.
    if cls.__qualname__ not in _HINTS:
        _HINTS[cls.__qualname__] = typing.get_type_hints(cls)
    return _HINTS[cls.__qualname__]


def _coerce(key: str, value: Any, ftype: Any) -> Any:
    """Check ``value`` against the field type; ints widen to floats, nothing else converts."""
    if typing.get_origin(ftype) is Literal:
        choices = typing.get_args(ftype)
        _require(value in choices, key, f"must be one of {', '.join(map(str, choices))}; got {value!r}.")
        return value
    if ftype is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}.")
        return value
    if typing.get_origin(ftype) in (typing.Union, types.UnionType):  # bool | Literal[...]
        words = [w for arg in typing.get_args(ftype) if typing.get_origin(arg) is Literal for w in typing.get_args(arg)]
        ok = isinstance(value, bool) or (isinstance(value, str) and value in words)
        _require(ok, key, f"must be true or false (or {' / '.join(map(json.dumps, words))}), got {value!r}.")
        return value
    if ftype is int:
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"must be an integer, got {value!r}.",
        )
        return value
    if ftype is float:
        _require(
            isinstance(value, int | float) and not isinstance(value, bool),
            key,
            f"must be a number, got {value!r}.",
        )
        return float(value)
    if ftype is str:
        _require(isinstance(value, str), key, f"must be a string, got {value!r}.")
        return value
    raise AssertionError(f"unsupported field type {ftype!r} for {key}")


def toml_scalar(value: Scalar) -> str:
    """A scalar as a TOML value (what Flower parses in app config, run config and node config)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def default_output_dir() -> str:
    """``runs/<timestamp>``: where a run goes when ``output.dir`` / ``--out`` is not given."""
    return time.strftime("runs/%Y%m%d-%H%M%S")


def flat_defaults() -> dict[str, Scalar]:
    """Every key with its default value."""
    return RunConfig().to_flat()


def parse_value(text: str) -> Scalar:
    """Parse a ``--set`` value as a TOML scalar (``8``, ``1e-3``, ``true``, ``"x"``), else a string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if isinstance(value, bool | int | float | str):
        return value
    return text


def parse_assignments(items: list[str]) -> dict[str, Scalar]:
    """Turn ``["k=v", ...]`` into a flat dict; a malformed item raises naming it."""
    out: dict[str, Scalar] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"`--set {item}` must have the form key=value.")
        out[key.strip()] = parse_value(text.strip())
    return out


def from_run_config(run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Plan:
    """The Plan a ServerApp runs: Flower's run_config, then ``overrides``, plan entries split off."""
    from fedtune.strategies.plan import Plan

    return Plan.from_flat({**dict(run_config), **dict(overrides or {})})
