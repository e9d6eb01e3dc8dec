"""PEFT methods (``peft.method``): what a site trains, how it is built, initialized and checked.

Every method's trainable state travels as named arrays: PEFT's own state-dict keys
(``get_peft_model_state_dict``) for ``lora``, ``ia3``, ``prompt-tuning`` and ``prefix-tuning``,
and the model's own parameter names for ``bitfit`` (its bias parameters) and ``full`` (all of
them, no PEFT wrapper). Each method has its own resident copy of the base model (``load_base``
slot), because PEFT's tuners inject layers into the model they wrap and bitfit / full train the
base weights themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import (
    IA3Config,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from peft.tuners.ia3 import IA3Layer
from transformers import AutoConfig, AutoModelForCausalLM

from fedtune.config import ModelConfig, RunConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import ModelError
from fedtune.data.loaders import load_records
from fedtune.data.prompts import IGNORE, collate, token_losses, tokenize
from fedtune.model import sb
from fedtune.model.adapters import adapter_arrays, init_adapter, peft_lora_config, set_trainable, wrap_peft
from fedtune.model.loading import LoadedModel, load_base, pick_dtype


@dataclass(frozen=True)
class MethodSpec:
    """What a ``peft.method`` is, and what the plan checker needs to know about it."""

    peft: bool
    """Wrapped by PEFT; the wire carries PEFT's state-dict keys and the output is a PEFT folder."""
    no_dp_sgd: str = ""
    """Why Opacus cannot compute correct per-example gradients for its parameters ("" if it can);
    tests/unit/test_peft_methods.py checks each entry against Opacus itself."""


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec(peft=True),
    "ia3": MethodSpec(
        peft=True,
        no_dp_sgd="PEFT keeps IA3's scaling vectors in a ParameterDict that is never called, so Opacus's hooks "
        "compute no per-example gradient for them",
    ),
    "prompt-tuning": MethodSpec(
        peft=True,
        no_dp_sgd="PEFT computes the soft prompt once per batch and repeats it, so Opacus would clip the whole "
        "batch's gradient as if it were one example's",
    ),
    "prefix-tuning": MethodSpec(peft=True),
    "bitfit": MethodSpec(peft=False),
    "full": MethodSpec(peft=False),
    "lora-sb": MethodSpec(peft=True),
}


def peft_config(cfg: RunConfig, rank: int | None = None) -> PeftConfig:
    """PEFT's own config for ``peft.method`` (LoRA at a site's ``rank`` when given)."""
    method, n = cfg.peft.method, cfg.peft.num_virtual_tokens
    if method in ("lora", "lora-sb"):
        return peft_lora_config(cfg.lora, rank)
    if method == "ia3":
        target, feedforward = cfg.peft.ia3_modules()
        return IA3Config(task_type="CAUSAL_LM", target_modules=target, feedforward_modules=feedforward)
    if method == "prompt-tuning":
        # Lester et al. 2021 (https://arxiv.org/abs/2104.08691): sampled-vocabulary init beats random init.
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB
        )
    if method == "prefix-tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    raise AssertionError(f"{method} has no PEFT config")


def _error_key(method: str) -> str:
    return {"lora": "lora.target-modules", "lora-sb": "lora.target-modules", "ia3": "peft.ia3-target-modules"}.get(
        method, "peft.method"
    )


def check_model(model: Any, cfg: RunConfig) -> None:
    """Refuse a method the model cannot take: bitfit without biases, full above its size limit."""
    method, name = cfg.peft.method, cfg.model.name
    if method == "bitfit" and not any(n.endswith(".bias") for n, _ in model.named_parameters()):
        raise ModelError(
            f"`peft.method` = bitfit trains bias parameters, and {name} has none (Llama-style models have "
            "none unless built with attention_bias / mlp_bias); choose another `peft.method`."
        )
    if method == "full":
        count = sum(p.numel() for p in model.parameters())
        if count > cfg.peft.full_max_params:
            raise ModelError(
                f"`peft.method` = full: {name} has {count:,} parameters, more than `peft.full-max-params` = "
                f"{cfg.peft.full_max_params:,}; raise it or choose a PEFT method."
            )


def check_model_files(cfg: RunConfig, path: str) -> None:
    """:func:`check_model` without loading any weights (a meta-device copy built from the config)."""
    if METHODS[cfg.peft.method].peft:
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    check_model(model, cfg)


def load_for(cfg: RunConfig, device: torch.device, model: ModelConfig | None = None) -> LoadedModel:
    """The resident base model for ``peft.method`` (its own copy, loaded once per process), checked;
    ``model`` overrides ``cfg.model`` (the server's unquantized copy on a CPU host)."""
    loaded = load_base(model or cfg.model, device, slot=cfg.peft.method)
    check_model(loaded.model, cfg)
    return loaded


def wrap(loaded: LoadedModel, cfg: RunConfig, rank: int | None = None) -> Any:
    """The model a site trains, with exactly the method's parameters trainable.

    PEFT methods get the shared PeftModel with this config's adapter active (LoRA at ``rank``,
    FFA-LoRA's A frozen); bitfit and full return the base model itself.
    """
    method = cfg.peft.method
    if METHODS[method].peft:
        model = wrap_peft(loaded, peft_config(cfg, rank), _error_key(method))
        set_trainable(model, method == "lora" and cfg.lora.freeze_a, method == "lora" and cfg.lora.freeze_b)
        if method == "lora-sb":
            sb.install_cores(model)
        return model
    model = loaded.model
    for pname, param in model.named_parameters():
        param.requires_grad_(method == "full" or pname.endswith(".bias"))
    return model


def initial_state(loaded: LoadedModel, cfg: RunConfig) -> Arrays:
    """The run's first global state, the same whatever ran before in this process.

    LoRA: PEFT's init (A random, B zero) seeded by ``seed``; IA3: ones (the identity); prompt
    tuning: rows of the word embedding at seeded random token ids (PEFT's SAMPLE_VOCAB); prefix
    tuning: the keys and values the base model computes for such tokens (Li & Liang 2021 found
    real-word activations a better start than random; PEFT's own N(0, 1) init took SmolLM2's
    held-out loss from 1.22 to 6.5); bitfit / full: the base model's weights as saved; lora-sb: the
    frozen factors ``peft.sb-init`` fixes (``model/sb.py``) and zero cores.
    """
    model = wrap(loaded, cfg)
    method = cfg.peft.method
    if method == "lora":
        init_adapter(model, cfg.seed)
    elif method == "lora-sb" and cfg.peft.sb_init == "gradient":
        sb.init_gradient(model, _calibration(loaded, cfg), lambda m, batch: _mean_loss(m, batch))
    elif method == "lora-sb":
        sb.init_svd(model)
    elif method == "ia3":
        for module in model.modules():
            if isinstance(module, IA3Layer) and model.active_adapter in module.ia3_l:
                module.reset_ia3_parameters(model.active_adapter)
    elif method in ("prompt-tuning", "prefix-tuning"):
        embedding = model.prompt_encoder[model.active_adapter].embedding
        words = model.get_input_embeddings().weight  # (V, D)
        generator = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(0, words.shape[0], (embedding.weight.shape[0],), generator=generator).to(words.device)
        with torch.no_grad():
            if method == "prompt-tuning":
                embedding.weight.copy_(words[ids].float())
            else:
                embedding.weight.copy_(prefix_of(model.get_base_model(), ids))
    else:
        return _saved_weights(loaded, cfg, set(adapter_arrays(model)))
    return adapter_arrays(model)


def _calibration(loaded: LoadedModel, cfg: RunConfig) -> list[dict[str, torch.Tensor]]:
    """``peft.sb-init-data`` as training batches (the training data's format and checks)."""
    records = load_records(cfg.peft.sb_init_data, cfg.data, key="peft.sb-init-data")
    examples = [e for e in tokenize(records, cfg.data, loaded.tokenizer) if any(t != IGNORE for t in e.labels[1:])]
    if not examples:
        raise ModelError(f"`peft.sb-init-data` {cfg.peft.sb_init_data}: no example has a response token to score.")
    size, pad = cfg.train.batch_size, int(loaded.tokenizer.pad_token_id)
    return [collate(examples[i : i + size], pad, loaded.device) for i in range(0, len(examples), size)]


def _mean_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    total, count = token_losses(model, batch)
    return total / count.clamp(min=1)


def prefix_of(base: Any, ids: torch.Tensor) -> torch.Tensor:
    """PEFT's prefix embedding (n, layers * 2 * kv_heads * head_dim) holding the keys and values
    ``base`` computes for the tokens ``ids`` (n,): with it, the model answers as the base model does
    after reading those tokens."""
    cache = base(input_ids=ids[None], use_cache=True).past_key_values
    per_layer = [
        torch.cat([layer.keys[0].transpose(0, 1).flatten(1), layer.values[0].transpose(0, 1).flatten(1)], dim=1)
        for layer in cache.layers  # keys, values: (1, kv_heads, n, head_dim)
    ]
    return torch.cat(per_layer, dim=1).float()  # (n, layers * 2 * kv_heads * head_dim)


def _saved_weights(loaded: LoadedModel, cfg: RunConfig, names: set[str]) -> Arrays:
    """The trainable parameters as the base model's files hold them (the resident copy may have
    been trained by an earlier run in this process)."""
    fresh = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=pick_dtype(cfg.model.dtype, loaded.device))
    return {n: p.detach().to(torch.float32).numpy().copy() for n, p in fresh.named_parameters() if n in names}


def trainable_count(model: Any) -> int:
    """Parameters the method trains (what one site's delta holds)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
