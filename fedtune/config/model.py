"""Config sections ``model.*``, ``lora.*`` and ``peft.*``: the base model and the adapter method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedtune.config.fields import require


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
        require(bool(self.name.strip()), "model.name", "must not be empty.")


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
    freeze_b: bool = False
    """B stays as the server sends it; only A is trained and sent (what ``lora.alternate`` does in its
    A rounds)."""
    alternate: bool = False
    """RoLoRA-style alternating training (Chen et al. 2025): odd rounds
    train and send only B (A frozen), even rounds only A (B frozen), so every round's FedAvg is exact
    (one factor is the same at every site) and the uplink shrinks to one factor. B comes first because
    it starts at zero, where A's gradient is zero."""
    share: Literal["ab", "a"] = "ab"
    """What a site sends: ``ab`` both LoRA matrices; ``a`` only the A matrices (FedSA-LoRA, Guo et al.,
    ICLR 2025, https://arxiv.org/abs/2410.01463): each site keeps its own B across rounds, and its
    personal adapter is (global A, own B)."""

    def __post_init__(self) -> None:
        require(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}.")
        require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}.")
        require(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}.")
        require(bool(self.modules()), "lora.target-modules", "must name at least one module.")

    def phase(self, rnd: int) -> dict[str, bool]:
        """Under ``lora.alternate``: round ``rnd``'s frozen factor as flat keys (odd rounds B, even A)."""
        if not self.alternate:
            return {}
        return {"lora.freeze-a": rnd % 2 == 1, "lora.freeze-b": rnd % 2 == 0}

    def modules(self) -> list[str] | str:
        """Target modules in the form PEFT expects."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


PEFT_METHODS = ("lora", "ia3", "prompt-tuning", "prefix-tuning", "bitfit", "full", "lora-sb")


@dataclass(frozen=True, kw_only=True)
class PeftSection:
    """``peft.*``: which parameters a site trains and sends (see README, "PEFT methods")."""

    method: Literal["lora", "ia3", "prompt-tuning", "prefix-tuning", "bitfit", "full", "lora-sb"] = "lora"
    """``lora`` (``lora.*``), ``ia3``, ``prompt-tuning``, ``prefix-tuning`` (PEFT's own configs),
    ``bitfit`` (only the base model's bias parameters), ``full`` (every parameter, no PEFT) or ``lora-sb``
    (Fed-SB / LoRA-SB, Singhal et al. 2025: LoRA at ``lora.r`` with A and B fixed by the server and only an
    r x r core between them trained and sent)."""
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

    sb_init: Literal["svd", "gradient"] = "svd"
    """How ``lora-sb`` fixes its frozen factors: ``svd`` from the truncated SVD of each target base weight
    (data-free, as LoRA-XS does); ``gradient`` from the truncated SVD of the base model's gradient on
    ``peft.sb-init-data`` (as LoRA-SB does)."""
    sb_init_data: str = ""
    """The calibration file (JSONL, the training data's format) ``peft.sb-init = gradient`` reads on the server."""

    def __post_init__(self) -> None:
        require(
            self.sb_init == "svd" or bool(self.sb_init_data.strip()),
            "peft.sb-init-data",
            "must name a calibration file when `peft.sb-init` = gradient.",
        )
        require(self.full_max_params >= 1, "peft.full-max-params", f"must be >= 1, got {self.full_max_params}.")
        require(
            self.num_virtual_tokens >= 1, "peft.num-virtual-tokens", f"must be >= 1, got {self.num_virtual_tokens}."
        )

    def ia3_modules(self) -> tuple[list[str] | None, list[str] | None]:
        """IA3's target and feed-forward modules as PEFT expects them (None: PEFT's default)."""

        def split(text: str) -> list[str] | None:
            return [m.strip() for m in text.split(",") if m.strip()] or None

        return split(self.ia3_target_modules), split(self.ia3_feedforward_modules)
