"""A fedtune adapter folder is vanilla PEFT: it loads with PeftModel and gives fedtune's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.config import LoraSection, ModelConfig
from fedtune.core.errors import ModelError
from fedtune.model.adapters import adapter_arrays, load_adapter_arrays, wrap_lora, write_adapter
from fedtune.model.loading import load_base
from fedtune.model.sources import resolve_model


def test_written_adapter_loads_with_vanilla_peft_and_matches_logits(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: fedtune's in-memory model with a non-trivial adapter
    loaded = load_base(ModelConfig(name=str(tiny_model)), torch.device("cpu"))
    lora = LoraSection(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    model = wrap_lora(loaded, lora)
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(scale=0.3, size=v.shape).astype(np.float32) for k, v in adapter_arrays(model).items()}
    load_adapter_arrays(model, arrays)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])

    # Execute
    write_adapter(tmp_path / "adapter", arrays, lora, loaded.path)
    vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(loaded.path), str(tmp_path / "adapter"))
    vanilla.eval()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = vanilla(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(loaded.path)(input_ids=ids).logits

    # Assert: equal to vanilla PEFT, and the adapter really changes the output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)


def test_missing_model_path_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"`model.name`: no such model directory"):
        resolve_model(ModelConfig(name=str(tmp_path / "nope")))


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"without config\.json"):
        resolve_model(ModelConfig(name=str(tmp_path)))


def test_missing_gguf_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"`model.gguf-file`: no such file"):
        resolve_model(ModelConfig(name=str(tmp_path), gguf_file="x.gguf"))
