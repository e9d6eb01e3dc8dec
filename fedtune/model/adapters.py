"""PEFT wrapping of the resident base model, and its trainable state <-> named numpy arrays."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.numpy import save_file

from fedtune.config import LoraSection
from fedtune.core.arrays import Arrays
from fedtune.core.errors import ModelError
from fedtune.model.loading import LoadedModel
from fedtune.model.sources import first_line


def peft_lora_config(cfg: LoraSection, rank: int | None = None) -> LoraConfig:
    """PEFT's LoraConfig for the ``lora.*`` section, optionally at a site's own lower ``rank``.

    A lower rank keeps alpha / r equal to the global adapter's, so a rank-r_i site holding the
    first r_i components of the global A and B computes exactly their truncated product.
    """
    r = rank or cfg.r
    return LoraConfig(
        r=r,
        lora_alpha=cast(int, cfg.alpha * r / cfg.r),
        lora_dropout=cfg.dropout,
        target_modules=cfg.modules(),
        task_type="CAUSAL_LM",
    )


_WRAPPED: dict[int, PeftModel] = {}


def wrap_lora(loaded: LoadedModel, cfg: LoraSection, rank: int | None = None) -> PeftModel:
    """The resident base wrapped by PEFT, with an adapter for this LoRA config active."""
    return wrap_peft(loaded, peft_lora_config(cfg, rank), "lora.target-modules")


def wrap_peft(loaded: LoadedModel, config: PeftConfig, key: str) -> PeftModel:
    """The resident base wrapped by PEFT, with an adapter for ``config`` active.

    One PeftModel per base model and process; every distinct config (a site's rank, a test's
    target modules) is a named adapter of it (PEFT's multi-adapter API), so sites that share a
    process share the base weights and switch adapters instead of reloading anything. ``key``
    is the config key a PEFT refusal is reported under.
    """
    name = "a" + hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    model = _WRAPPED.get(id(loaded.model))
    try:
        if model is None:
            model = _WRAPPED[id(loaded.model)] = get_peft_model(loaded.model, config, adapter_name=name)
        elif name not in model.peft_config:
            model.add_adapter(name, config)
    except ValueError as exc:
        raise ModelError(f"`{key}`: {first_line(exc)}") from None
    model.set_adapter(name)
    return model


def init_adapter(model: PeftModel, seed: int) -> None:
    """Re-initialize the active adapter as PEFT does (A random, B zero), seeded, in module order."""
    name = model.active_adapter
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.reset_lora_parameters(name, True)


def set_trainable(model: PeftModel, freeze_a: bool, freeze_b: bool = False) -> None:
    """Train the active adapter only; with FFA-LoRA (``freeze_a``) only its B matrices, with ``freeze_b``
    only its A matrices."""
    active = model.active_adapter
    model.set_adapter(active)
    if model.peft_config[active].is_prompt_learning:  # set_adapter leaves other prompts trainable
        for name, encoder in model.prompt_encoder.items():
            encoder.requires_grad_(name == active)
    frozen = [part for part, on in ((".lora_A.", freeze_a), (".lora_B.", freeze_b)) if on]
    for pname, param in model.named_parameters():
        if any(part in pname for part in frozen):
            param.requires_grad_(False)


def adapter_arrays(model: Any) -> Arrays:
    """The trainable state as float32 numpy arrays: PEFT's state-dict keys for the active adapter
    of a PeftModel, the model's own parameter names for a plain model (bitfit, full)."""
    if isinstance(model, PeftModel):
        state = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    else:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()}


def adapter_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The names and shapes :func:`adapter_arrays` gives for ``model``, without copying anything."""
    if isinstance(model, PeftModel):
        state = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    else:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {k: tuple(v.shape) for k, v in state.items()}


def load_adapter_arrays(model: Any, arrays: Arrays) -> None:
    """Load ``arrays`` (the keys :func:`adapter_arrays` gives) into the model; every key must match."""
    device = next(model.parameters()).device
    if not isinstance(model, PeftModel):
        _load_plain(model, arrays, device)
        return
    tensors = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in arrays.items()}
    result = set_peft_model_state_dict(model, tensors, adapter_name=model.active_adapter)
    # Prompt learning loads "prompt_embeddings" into the prompt encoder itself (strictly).
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if k != "prompt_embeddings"]
    if unexpected:
        raise ModelError(f"adapter keys do not match the model: {unexpected[:3]}")


def _load_plain(model: Any, arrays: Arrays, device: torch.device) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(arrays) != set(params):
        odd = sorted(set(arrays) ^ set(params))
        raise ModelError(f"trainable keys do not match the model: {odd[:3]}")
    with torch.no_grad():
        for key, value in arrays.items():
            param = params[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ModelError(f"{key!r} has shape {tuple(value.shape)}, the model {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.asarray(value)).to(device, param.dtype))


def write_adapter(directory: Path, arrays: Arrays, lora: LoraSection, base_path: str) -> None:
    """Write a vanilla PEFT LoRA adapter folder (``adapter_config.json`` + safetensors) in place."""
    write_peft_folder(directory, arrays, peft_lora_config(lora), base_path)


def write_peft_folder(directory: Path, arrays: Arrays, config: PeftConfig, base_path: str) -> None:
    """Write a vanilla PEFT folder for ``config`` (what ``save_pretrained`` writes) in place."""
    config = copy.deepcopy(config)
    config.base_model_name_or_path = base_path
    config.inference_mode = True  # as PeftModel.save_pretrained saves it
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(directory / "adapter_model.safetensors"))
