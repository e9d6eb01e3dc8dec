"""A finished run's output folder as ``fedtune export``, ``chat`` and ``evaluate`` read it, and its model.

A run leaves ``OUT/summary.json`` (with the config it ran under) and either ``OUT/adapter/`` (a
vanilla PEFT folder) or ``OUT/model/`` (the whole fine-tuned model, for ``peft.method`` bitfit and
full). The names are the server's (``fedtune.server.outputs``, ``fedtune.server.report.files``);
a test keeps them equal, since this layer cannot import the server's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from fedtune.config import RunConfig
from fedtune.core.errors import FedtuneError, ModelError
from fedtune.model.sources import first_line, load_tokenizer, resolve_model

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FinishedRun:
    """What a run left in ``out``: its summary, its config, and where its trained state is."""

    out: Path
    summary: dict[str, Any]
    cfg: RunConfig
    weights: Path
    """``OUT/adapter`` (a PEFT folder) or ``OUT/model`` (a whole model folder)."""

    @property
    def peft(self) -> bool:
        """True when the run's output is a PEFT adapter on top of the base model."""
        return self.weights.name == ADAPTER_DIR

    def base_path(self) -> str:
        """Where the base model is loaded from here (``model.name`` resolved as training did)."""
        return resolve_model(self.cfg.model)


def open_run(out: Path) -> FinishedRun:
    """Read ``out``'s summary and config and find its adapter or model, or say in one line what is missing."""
    if not out.is_dir():
        raise ModelError(f"{out}: no such run directory.")
    summary_path = out / SUMMARY_FILE
    if not summary_path.is_file():
        raise ModelError(
            f"{summary_path}: missing; {out} is not a finished fedtune run (summary.json is written last)."
        )
    try:
        summary = json.loads(summary_path.read_text())
        flat = summary["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{summary_path}: not a fedtune summary ({first_line(exc)}).") from None
    try:
        cfg = RunConfig.from_flat(flat)
    except FedtuneError as exc:
        raise ModelError(f"{summary_path}: its config is not valid here: {exc}") from None
    adapter, model = out / ADAPTER_DIR, out / MODEL_DIR
    if (adapter / "adapter_config.json").is_file():
        weights = adapter
    elif (model / "config.json").is_file():
        weights = model
    else:
        raise ModelError(
            f"{adapter}: missing (no adapter_config.json there, nor {MODEL_DIR}/config.json): no final model."
        )
    return FinishedRun(out=out, summary=summary, cfg=cfg, weights=weights)


def load_run_model(
    run: FinishedRun, *, base: bool = False, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The run's final model (base + adapter as a PeftModel, or the whole fine-tuned model), or with
    ``base`` the base model alone, in eval mode, with the base model's tokenizer."""
    tokenizer = load_tokenizer(run.base_path())
    path = run.base_path() if base or run.peft else str(run.weights)
    model = load_causal_lm(path, dtype, device)
    if not base and run.peft:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run.weights))
    model.eval()
    return model, tokenizer


def load_causal_lm(path: str, dtype: torch.dtype, device: str) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with the KV cache on, or one line saying why not."""
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model at {path!r}: {first_line(exc)}") from None
    model.config.use_cache = True
    return model.to(device)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is absent or unreadable (optional run outputs)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def metrics_rows(run: FinishedRun) -> list[dict[str, Any]]:
    """The rows of ``OUT/metrics.jsonl`` (empty when it is absent)."""
    path = run.out / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
