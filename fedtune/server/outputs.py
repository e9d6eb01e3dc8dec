"""Writing a run's global state: a vanilla PEFT folder, or a full model folder for bitfit / full.

PEFT methods (lora, ia3, prompt-tuning, prefix-tuning) write what ``PeftModel.save_pretrained``
writes, from the arrays alone: ``adapter_config.json`` (the wrapped model's own, filled-in config)
and ``adapter_model.safetensors`` keyed by PEFT's state-dict keys, so
``PeftModel.from_pretrained(base, folder)`` loads it. bitfit and full change the base model's own
weights, so their output is a whole model folder (``save_pretrained`` plus the tokenizer) that
``AutoModelForCausalLM.from_pretrained(folder)`` loads; their checkpoints keep only the trainable
state (``weights.safetensors``), which is all a resumed run needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.numpy import load_file, save_file

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.model import sb
from fedtune.model.adapters import load_adapter_arrays, write_peft_folder
from fedtune.model.loading import LoadedModel
from fedtune.model.methods import METHODS, wrap
from fedtune.model.sources import base_source

ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapter_model.safetensors"
WEIGHTS_FILE = "weights.safetensors"
MODEL_DIR = "model"


@dataclass(frozen=True)
class Writer:
    """Writes the global state of a run with ``cfg``'s method on the base model ``loaded``."""

    cfg: RunConfig
    loaded: LoadedModel

    @property
    def peft(self) -> bool:
        return METHODS[self.cfg.peft.method].peft

    def final_name(self) -> str:
        """The run's output folder under OUT: ``adapter`` (PEFT methods) or ``model`` (bitfit, full)."""
        return ADAPTER_DIR if self.peft else MODEL_DIR

    def checkpoint(self, directory: Path, arrays: Arrays) -> None:
        """The state a checkpoint keeps: the PEFT folder ``adapter/``, or ``weights.safetensors``."""
        if self.peft:
            self._peft_folder(directory / ADAPTER_DIR, arrays)
        else:
            save_file(dict(arrays), str(directory / WEIGHTS_FILE))

    def _peft_folder(self, directory: Path, arrays: Arrays) -> None:
        model = wrap(self.loaded, self.cfg)
        config = model.peft_config[model.active_adapter]
        # The hub id where the base has one, so the folder loads on any machine (summary.json
        # records the exact local source beside it).
        write_peft_folder(directory, arrays, config, base_source(self.cfg.model, self.loaded.path)["name"])

    def final(self, directory: Path, arrays: Arrays) -> None:
        """The run's output, written into ``directory`` (a fresh temp dir the caller renames); LoRA-SB's
        cores folded into B, so that it is a vanilla PEFT LoRA adapter (a checkpoint keeps them)."""
        if self.peft:
            self._peft_folder(directory, sb.fold(arrays))
            return
        model = wrap(self.loaded, self.cfg)
        load_adapter_arrays(model, arrays)
        use_cache = model.config.use_cache
        model.config.use_cache = True  # fedtune turns the KV cache off for training, not for users
        try:
            model.save_pretrained(str(directory))
        finally:
            model.config.use_cache = use_cache
        self.loaded.tokenizer.save_pretrained(str(directory))


def read_checkpoint(directory: Path) -> Arrays:
    """The global state a checkpoint directory holds, whichever method wrote it."""
    peft_file = directory / ADAPTER_DIR / ADAPTER_FILE
    return load_file(str(peft_file if peft_file.is_file() else directory / WEIGHTS_FILE))
