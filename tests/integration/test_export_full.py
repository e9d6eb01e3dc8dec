"""``fedtune export`` of a run whose method trains the whole model (``peft.method = full``): OUT/model is
exported as it is, cast to the chosen dtype, whether or not --merge is given. OUT is built from its
pieces: the tiny base, a changed copy of it as OUT/model, and a summary.json with the run's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from fedtune.cli import main
from fedtune.config import RunConfig
from fedtune.config.presets import preset
from fedtune.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    base_dir = build_tiny_model(out / "base-model")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))  # the "fine-tuned" whole model
    model.save_pretrained(str(out / "model"))
    flat = {**preset("tiny"), "model.name": str(base_dir), "peft.method": "full"}
    (out / "summary.json").write_text(json.dumps({"rounds": 1, "config": RunConfig.from_flat(flat).to_flat()}))
    return out


@pytest.mark.parametrize("merge", [False, True])
def test_full_run_exports_its_own_model_in_the_chosen_dtype(run_dir: Path, tmp_path: Path, merge: bool) -> None:
    # Prepare
    trained = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"), dtype=torch.float32).state_dict()
    dest = tmp_path / "export"

    # Execute
    status = main(["export", str(run_dir), "--out", str(dest), "--dtype", "fp16", *(["--merge"] if merge else [])])

    # Assert: the run's weights, cast to fp16, with a transformers model card
    assert status == 0
    exported = AutoModelForCausalLM.from_pretrained(str(dest)).state_dict()
    assert set(exported) == set(trained)
    for key, value in exported.items():
        assert value.dtype == torch.float16 and torch.equal(value, trained[key].to(torch.float16)), key
    card = ModelCard.load(dest / "README.md")
    assert card.data.library_name == "transformers" and "full" in card.data.tags
    assert "the full fine-tuned model (fp16)" in card.text
