"""``fedtune export``: a finished run's model as a Hub-ready folder (the model, its tokenizer, a model card).

Without ``merge`` the folder is the run's PEFT adapter (``PeftModel.from_pretrained(base, DIR)``),
with ``base_model_name_or_path`` pointing at the hub id when ``model.name`` is one. With ``merge``
it is a plain transformers model (``AutoModelForCausalLM.from_pretrained(DIR)``): the base in fp32
with PEFT's ``merge_and_unload``, then cast to the chosen dtype. bitfit and full runs already are
whole models, so both forms give the model itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedtune.core.atomic import write_atomic_dir
from fedtune.core.errors import ModelError
from fedtune.model.card import is_hub_id, model_card
from fedtune.model.finished import DTYPES, FinishedRun, load_run_model
from fedtune.model.sources import load_tokenizer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT methods whose weights fold into the base's: prompt and prefix tuning add virtual tokens instead.
MERGEABLE = ("lora", "ia3", "lora-sb")  # lora-sb: its output is a vanilla LoRA folder


def export_run(run: FinishedRun, dest: Path, *, merge: bool, dtype: str) -> Path:
    """Write the run's model, tokenizer and ``README.md`` into ``dest`` (built beside it, then renamed)."""
    if dtype not in DTYPES:
        raise ModelError(f"`--dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelError(f"`--out` {dest}: exists and is not an empty directory; remove it or choose another.")
    method = run.cfg.peft.method
    if merge and run.peft and method not in MERGEABLE:
        raise ModelError(
            f"`--merge`: `peft.method` = {method} adds virtual tokens and cannot be merged into the weights; "
            "export the adapter (without --merge)."
        )
    full = merge or not run.peft

    def fill(tmp: Path) -> None:
        if full:
            write_full_model(run, tmp, DTYPES[dtype])
        else:
            write_adapter_copy(run, tmp, DTYPES[dtype])
        load_tokenizer(run.base_path()).save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(run, merged=full and run.peft, dtype=dtype))

    write_atomic_dir(dest, fill)
    return dest


def write_full_model(run: FinishedRun, directory: Path, dtype: torch.dtype) -> None:
    """The whole model: base + adapter merged in fp32 (PEFT runs) or the run's own model, cast to ``dtype``."""
    model, _ = load_run_model(run, dtype=torch.float32)
    if run.peft:
        model = model.merge_and_unload()
    model.to(dtype)
    model.save_pretrained(str(directory))


def write_adapter_copy(run: FinishedRun, directory: Path, dtype: torch.dtype) -> None:
    """The run's PEFT folder, its floating-point tensors cast to ``dtype`` and its base named for others."""
    config = json.loads((run.weights / ADAPTER_CONFIG).read_text())
    name = run.cfg.model.name
    config["base_model_name_or_path"] = name if is_hub_id(name) and not run.cfg.model.gguf_file else run.base_path()
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = load_file(str(run.weights / ADAPTER_WEIGHTS))
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(cast, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})  # as PEFT writes it
