"""LoRA-SB (``peft.method = lora-sb``): the frozen factors each init fixes (numpy / autograd references),
Opacus on the cores, and the plan checker's one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.core.errors import ConfigError, IncompatibleComponentsError
from fedtune.data.prompts import collate, token_losses, tokenize
from fedtune.model.adapters import load_adapter_arrays
from fedtune.model.methods import initial_state, load_for, trainable_count, wrap
from fedtune.model.sb import CORE
from fedtune.privacy import compat
from tests.unit.test_peft_methods import per_example_grads_match

DEMO = Path(__file__).parents[2] / "fedtune" / "data" / "demo" / "train.jsonl"


def config(model: Path, **flat: Any) -> RunConfig:
    return RunConfig.from_flat({"model.name": str(model), "peft.method": "lora-sb", "lora.dropout": 0.0, **flat})


def factors(arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per target module (the base model's parameter name): (B, core, A) in float64."""
    out = {}
    for key in (k for k in arrays if CORE in k):
        module = key.split(CORE)[0].removeprefix("base_model.model.")
        out[module + ".weight"] = tuple(
            arrays[key.replace(CORE, part)].astype(np.float64) for part in (".lora_B.", CORE, ".lora_A.")
        )
    return out  # type: ignore[return-value]


def test_svd_init_is_the_best_rank_r_approximation_and_starts_at_the_base_model(tiny_model: Path) -> None:
    # Prepare
    cfg = config(tiny_model)
    loaded = load_for(cfg, torch.device("cpu"))
    base = dict(AutoModelForCausalLM.from_pretrained(str(tiny_model)).named_parameters())
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])

    # Execute
    init = initial_state(loaded, cfg)
    model = wrap(loaded, cfg)
    load_adapter_arrays(model, init)
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits

    # Assert: numpy's truncated SVD of each base weight, the cores zero, only the cores trainable
    found = factors(init)
    targets = cfg.lora.modules()
    assert sorted(found) == sorted(n for n in base if n.split(".")[-2] in targets and n.endswith(".weight"))
    for name, (b, core, a) in found.items():
        u, s, vh = np.linalg.svd(base[name].detach().double().numpy(), full_matrices=False)
        r = core.shape[0]
        np.testing.assert_allclose(b @ a, (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(core, 0)
    assert trainable_count(model) == sum(c.size for _, c, _ in found.values())
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)


def test_gradient_init_is_the_svd_of_the_base_gradient_on_the_calibration_file(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Prepare: a calibration file, and the reference gradient from a plain transformers model
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(line for line in DEMO.read_text().splitlines(keepends=True)[:6]))
    cfg = config(tiny_model, **{"peft.sb-init": "gradient", "peft.sb-init-data": str(data), "train.batch-size": 4})
    loaded = load_for(cfg, torch.device("cpu"))
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    examples = tokenize([json.loads(line) for line in data.read_text().splitlines()], cfg.data, loaded.tokenizer)
    for start in range(0, len(examples), 4):
        total, count = token_losses(plain, collate(examples[start : start + 4], loaded.tokenizer.pad_token_id, "cpu"))
        (total / count).backward()
    grads = {n: p.grad.double().numpy() for n, p in plain.named_parameters() if p.grad is not None}

    # Execute
    found = factors(initial_state(loaded, cfg))

    # Assert: B A is U_r V_r^T of the gradient's SVD (sign-free), the cores zero
    for name, (b, core, a) in found.items():
        u, _, vh = np.linalg.svd(grads[name], full_matrices=False)
        r = core.shape[0]
        np.testing.assert_allclose(b @ a, u[:, :r] @ vh[:r], rtol=1e-3, atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(core, 0)


def test_opacus_computes_the_cores_per_example_gradients(tiny_model: Path) -> None:
    # Prepare: the SVD factors in place, the cores moved off zero so every core has a gradient
    cfg = config(tiny_model)
    loaded = load_for(cfg, torch.device("cpu"))
    init = initial_state(loaded, cfg)
    rng = np.random.default_rng(0)
    model = wrap(loaded, cfg)
    load_adapter_arrays(model, {k: (0.1 * rng.standard_normal(v.shape) if CORE in k else v) for k, v in init.items()})

    # Execute / Assert
    assert per_example_grads_match(model)
    model(input_ids=torch.tensor([[5, 17, 42]])).logits.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad()


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        (
            {"lora.share": "a"},
            "sends only the A matrices of a LoRA adapter; it needs `peft.method` = lora, got lora-sb.",
        ),
        ({"lora.alternate": True}, "it needs `peft.method` = lora, got lora-sb."),
        ({"plan.2.lora.alternate": True}, "it needs `peft.method` = lora, got lora-sb."),
        ({"lora.freeze-a": True}, "`lora.freeze-a` (FFA-LoRA) needs `peft.method` = lora, got lora-sb."),
        ({"simulation.site-ranks": "4,2"}, "`simulation.site-ranks` (heterogeneous LoRA ranks) needs `peft.method`"),
        ({"strategy.name": "exact"}, "`strategy.name` = exact is defined for LoRA adapters only"),
        ({"plan.2.peft.method": "lora"}, "peft.method"),
    ],
)
def test_what_cannot_compose_is_refused_in_one_line_before_round_1(flat: dict[str, Any], needle: str) -> None:
    with pytest.raises((IncompatibleComponentsError, ConfigError)) as err:
        compat.check(Plan.from_flat({"peft.method": "lora-sb", "num-server-rounds": 2, "lora.r": 4, **flat}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_gradient_init_needs_a_calibration_file() -> None:
    with pytest.raises(ConfigError, match=r"peft.sb-init-data.*must name a calibration file"):
        RunConfig.from_flat({"peft.method": "lora-sb", "peft.sb-init": "gradient"})
