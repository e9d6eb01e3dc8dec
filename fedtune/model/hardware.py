"""What a site's GPU settings need from its machine, and how they turn into model-loading arguments.

The settings (``model.quantization``, ``model.device-map``, ``train.precision``,
``train.num-processes``) are checked before anything loads, so a site that cannot honour them
refuses with one line naming the key and the site, instead of failing deep inside bitsandbytes or
NCCL.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Any

import torch

from fedtune.config import ModelConfig, RunConfig
from fedtune.core.errors import ConfigError

log = logging.getLogger(__name__)

GPU_EXTRA = "pip install 'fedtune[gpu]'"


def on_cuda(device: str) -> bool:
    """Whether ``train.device`` = ``device`` trains on CUDA on this machine."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_site(cfg: RunConfig, where: str) -> None:
    """Refuse settings this machine cannot run, naming the key and ``where`` (the site).

    Parameters
    ----------
    cfg
        The site's effective config (the round spec with the site's own keys over it).
    where
        The site, as the message should name it (``site 2``, ``this site``).
    """
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`train.device` = cuda at {where}, but no CUDA device is available.")
    cuda = on_cuda(cfg.train.device)
    why = "`train.device` is cpu" if cfg.train.device == "cpu" else "no CUDA device is available"
    quant = cfg.model.quantization
    if quant != "none":
        if not cuda:
            raise ConfigError(f"`model.quantization` = {quant} at {where} needs a CUDA GPU (bitsandbytes), but {why}.")
        for module in ("bitsandbytes", "accelerate"):
            if not _has(module):
                raise ConfigError(f"`model.quantization` = {quant} at {where} needs {module}: {GPU_EXTRA}.")
    if cfg.model.device_map:
        if not cuda:
            raise ConfigError(f"`model.device-map` = auto at {where} spreads the model over GPUs, but {why}.")
        if not _has("accelerate"):
            raise ConfigError(f"`model.device-map` = auto at {where} needs accelerate: {GPU_EXTRA}.")
    if cfg.train.precision == "fp16" and not cuda:
        raise ConfigError(
            f"`train.precision` = fp16 at {where} is for CUDA GPUs (fp16 with a gradient scaler), but {why}; "
            "use bf16 (same memory, no scaler) or fp32 on the CPU."
        )
    procs = cfg.train.num_processes
    if procs > 1 and cuda and torch.cuda.device_count() < procs:
        raise ConfigError(
            f"`train.num-processes` = {procs} at {where} needs one GPU per process, and it has "
            f"{torch.cuda.device_count()}."
        )


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that does without emulation (Ampere or
    newer), or a CPU with AVX512-BF16 or AMX, by torch's own CPU feature checks. Elsewhere bf16 can be
    slower than fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(probe()) for name in probes if (probe := getattr(torch.cpu, name, None)) is not None)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as a site trains on ``device``: ``auto`` is bf16 where :func:`native_bf16`,
    else fp32 (never fp16, which needs a scaler and loses range). DP-SGD never autocasts."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``; None for fp32 (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device))


def load_kwargs(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for a quantized or device-mapped base model.

    A quantized model is placed by bitsandbytes at load time (it cannot be moved afterwards), so it
    gets a device map too: the whole model on ``device``, or spread with ``auto``.
    """
    kwargs: dict[str, Any] = {}
    if cfg.quantization != "none":
        from transformers import BitsAndBytesConfig

        if cfg.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if cfg.device_map:
        kwargs["device_map"] = "auto"
    elif cfg.quantization != "none":
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    return kwargs


def placed_at_load(cfg: ModelConfig) -> bool:
    """Whether ``from_pretrained`` already placed the model (it must not be moved with ``.to``)."""
    return cfg.quantization != "none" or bool(cfg.device_map)


def prepare_quantized(model: Any, cfg: ModelConfig) -> Any:
    """PEFT's k-bit preparation for a quantized base (QLoRA): norms and head in fp32, input grads on.

    Gradient checkpointing is left to ``train.gradient-checkpointing`` (see the trainer).
    """
    if cfg.quantization == "none":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def server_model(cfg: ModelConfig) -> ModelConfig:
    """The server's copy of the base: quantized or device-mapped only where CUDA is present.

    A CPU server (seeded adapter init, centralized evaluation) loads the plain base instead; the
    adapter's keys, shapes and seeded initialization are the same either way.
    """
    if (cfg.quantization == "none" and not cfg.device_map) or torch.cuda.is_available():
        return cfg
    log.info("No CUDA here: the server evaluates on the unquantized base (sites keep `model.quantization`).")
    return dataclasses.replace(cfg, quantization="none", device_map="")
