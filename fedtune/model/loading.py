"""The base model resident in this process, and the device and dtype it runs at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from fedtune.config import ModelConfig
from fedtune.core.errors import ModelError
from fedtune.model.hardware import load_kwargs, placed_at_load, prepare_quantized
from fedtune.model.sources import first_line, load_tokenizer, resolve_model


def pick_device(wanted: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ModelError("`train.device` is cuda but no CUDA device is available.")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def pick_dtype(wanted: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    if wanted == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if wanted == "bfloat16" else torch.float32


@dataclass
class LoadedModel:
    """A base model resident in this process, with its tokenizer and where it came from."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    path: str
    device: torch.device


_RESIDENT: dict[tuple[str, ...], LoadedModel] = {}


def load_base(cfg: ModelConfig, device: torch.device, slot: str = "lora") -> LoadedModel:
    """Load the base model once per process and keep it resident (never reloaded per round).

    Each ``slot`` (a ``peft.method``) gets its own copy: PEFT's tuners inject layers into the model
    they wrap, and bitfit / full train the base weights themselves.
    """
    path = resolve_model(cfg)
    dtype = pick_dtype(cfg.dtype, device)
    key = (path, str(dtype), str(device), cfg.quantization, cfg.device_map, slot)
    if key not in _RESIDENT:
        tok = load_tokenizer(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **load_kwargs(cfg, device, dtype))
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"`model.name`: cannot load {cfg.name!r} (not a local directory, and not loadable "
                f"from the Hugging Face hub or its cache): {first_line(exc)}"
            ) from None
        if not placed_at_load(cfg):
            cast(Any, model).to(device)
        model = prepare_quantized(model, cfg)
        model.config.use_cache = False
        model.requires_grad_(False)  # the method decides what trains (PEFT freezes the base too)
        _RESIDENT[key] = LoadedModel(model=model, tokenizer=tok, path=path, device=device)
    return _RESIDENT[key]
