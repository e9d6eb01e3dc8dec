"""``peft.method``: the method table, the plan checker's refusals, and the model refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from opacus import GradSampleModule
from transformers import AutoModelForCausalLM

from fedtune.config import PEFT_METHODS, RunConfig
from fedtune.config.plan import Plan
from fedtune.core.errors import IncompatibleComponentsError, ModelError
from fedtune.data.prompts import IGNORE, Example, collate, token_losses
from fedtune.model.adapters import load_adapter_arrays
from fedtune.model.methods import METHODS, check_model_files, initial_state, load_for, wrap
from fedtune.privacy import compat
from fedtune.server.validation import rank_ok
from fedtune.strategies import STRATEGIES


def config(model: Path, method: str, **flat: Any) -> RunConfig:
    base = {"model.name": str(model), "peft.method": method, "peft.num-virtual-tokens": 4, "lora.dropout": 0.0}
    return RunConfig.from_flat({**base, **flat})


def per_example_grads_match(model: Any) -> bool:
    """Whether Opacus's per-example gradients (hooks mode) equal each example's own gradient."""
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 9, 10, 11, 12, 13], [40, 41, 42, 43, 44, 45]])
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train()  # Opacus records activations in training mode only (no dropout here: lora.dropout = 0)

    def loss(m: Any, rows: slice) -> torch.Tensor:
        logits = m(input_ids=ids[rows], attention_mask=mask[rows]).logits
        return logits.float().pow(2).mean(dim=(1, 2)).sum()  # a per-example sum

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        loss(gsm, slice(0, 3)).backward()
        samples = [getattr(p, "grad_sample", None) for _, p in params]
    except (ValueError, RuntimeError):
        return False
    finally:
        gsm._close()
        for _, p in params:
            p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
    if any(s is None or s.shape[0] != 3 for s in samples):
        return False
    for row in range(3):
        model.zero_grad()
        loss(model, slice(row, row + 1)).backward()
        for (_, p), sample in zip(params, samples, strict=True):
            if not torch.allclose(sample[row], p.grad, atol=1e-5, rtol=1e-4):  # type: ignore[index]
                return False
    model.zero_grad()
    return True


def test_every_method_has_a_spec() -> None:
    assert tuple(METHODS) == PEFT_METHODS


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_dp_sgd_table_matches_what_opacus_computes(method: str, tiny_model: Path, tiny_model_biases: Path) -> None:
    # Prepare: the method's own trainable model, as a site builds it
    cfg = config(tiny_model_biases if method == "bitfit" else tiny_model, method)
    model = wrap(load_for(cfg, torch.device("cpu")), cfg)

    # Execute
    correct = per_example_grads_match(model)

    # Assert: the plan checker allows dp-sgd exactly where Opacus gets per-example gradients right
    assert correct == (METHODS[method].no_dp_sgd == "")


@pytest.mark.parametrize("method", PEFT_METHODS)
@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_strategy_support_per_method(method: str, strategy: str, tiny_model: Path) -> None:
    flat = {"peft.method": method, "plan.2.strategy.name": strategy, "server.min-clients": 10}
    found = compat.problems(Plan.from_flat(flat))
    lora_only = STRATEGIES.get(strategy).lora_only
    assert bool(found) == (lora_only and method != "lora"), found
    if found:
        assert found == [
            f"round 2: `strategy.name` = {strategy} is defined for LoRA adapters only, not `peft.method` = "
            f"{method}; use a fedavg-family or robust strategy."
        ]


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"lora.freeze-a": True}, "`lora.freeze-a` (FFA-LoRA) needs `peft.method` = lora, got ia3."),
        ({"simulation.site-ranks": "8,4"}, "`simulation.site-ranks` (heterogeneous LoRA ranks) needs `peft.method`"),
        ({"privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0}, "`privacy.mechanism` = dp-sgd with"),
    ],
)
def test_lora_only_settings_are_refused_with_one_line(flat: dict[str, Any], needle: str) -> None:
    with pytest.raises(IncompatibleComponentsError) as err:
        compat.check(Plan.from_flat({"peft.method": "ia3", "num-server-rounds": 2, **flat}))
    assert str(err.value).startswith("rounds 1-2: ") and needle in str(err.value)
    assert "|" not in str(err.value)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_secagg_and_central_dp_compose_with_every_method(method: str) -> None:
    flat = {"peft.method": method, "secagg.protocol": "secagg", "server.min-clients": 3}
    central = {"peft.method": method, "privacy.mechanism": "central", "privacy.noise-multiplier": 1.0}
    assert compat.problems(Plan.from_flat(flat)) == []
    assert compat.problems(Plan.from_flat({**central, "strategy.weighting": "uniform"})) == []


def test_bitfit_on_a_model_without_biases_is_refused_naming_key_and_model(tiny_model: Path) -> None:
    with pytest.raises(ModelError, match=rf"^`peft.method` = bitfit trains bias parameters, and {tiny_model} has none"):
        check_model_files(config(tiny_model, "bitfit"), str(tiny_model))


def test_full_above_its_limit_is_refused_with_the_parameter_count(tiny_model: Path) -> None:
    # Prepare: the reference count from the model itself
    count = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_model)).parameters())
    cfg = config(tiny_model, "full", **{"peft.full-max-params": count - 1})

    # Execute / Assert
    with pytest.raises(ModelError) as err:
        check_model_files(cfg, str(tiny_model))
    assert str(err.value) == (
        f"`peft.method` = full: {tiny_model} has {count:,} parameters, more than `peft.full-max-params` = "
        f"{count - 1:,}; raise it or choose a PEFT method."
    )
    check_model_files(config(tiny_model, "full", **{"peft.full-max-params": count}), str(tiny_model))


@pytest.mark.parametrize(("rank", "full_rank", "ok"), [(0, 0, True), (1, 0, False), (0, 8, False), (8, 8, True)])
def test_a_reported_rank_must_fit_the_method(rank: int, full_rank: int, ok: bool) -> None:
    assert rank_ok(rank, full_rank) == ok


def test_prefix_init_makes_the_model_answer_as_after_reading_real_tokens(tiny_model: Path) -> None:
    # Prepare: the initial global prefix, loaded into the site's model
    cfg = config(tiny_model, "prefix-tuning")
    loaded = load_for(cfg, torch.device("cpu"))
    model = wrap(loaded, cfg)
    load_adapter_arrays(model, initial_state(loaded, cfg))
    words = model.get_input_embeddings().weight
    ids = torch.randint(0, words.shape[0], (4,), generator=torch.Generator().manual_seed(cfg.seed))
    tail = torch.tensor([[5, 17, 42, 99, 7]])

    # Execute
    with torch.no_grad():
        prefixed = model.eval()(input_ids=tail, attention_mask=torch.ones_like(tail)).logits
        with model.disable_adapter():
            after_tokens = model(input_ids=torch.cat([ids[None], tail], dim=1)).logits[:, 4:]
            without = model(input_ids=tail).logits

    # Assert: the same as the base model reading those 4 tokens first, and not the bare base model
    torch.testing.assert_close(prefixed, after_tokens, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(prefixed, without, atol=1e-3)


@pytest.mark.parametrize("method", ["bitfit", "full"])
def test_a_quantized_base_is_refused_for_methods_that_train_base_weights(method: str) -> None:
    found = compat.problems(Plan.from_flat({"peft.method": method, "model.quantization": "4bit"}))
    assert found == [
        f"rounds 1-3: `model.quantization` = 4bit with `peft.method` = {method}: quantized base weights cannot be "
        "trained or saved as a model; use a PEFT method (QLoRA)."
    ]


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_training_loss_scores_the_batch_own_tokens(method: str, tiny_model: Path, tiny_model_biases: Path) -> None:
    # Prepare: a padded batch with prompt (IGNORE) and response labels, and the method's model
    cfg = config(tiny_model_biases if method == "bitfit" else tiny_model, method)
    model = wrap(load_for(cfg, torch.device("cpu")), cfg).eval()
    batch = collate(
        [Example([5, 17, 42, 99, 7, 3], [IGNORE] * 3 + [99, 7, 3]), Example([8, 9, 10], [IGNORE, 9, 10])],
        0,
        torch.device("cpu"),
    )

    # Execute
    with torch.no_grad():
        total, count = token_losses(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -6:]

    # Assert: the reference scores each response token from all logits, virtual tokens cut off
    target = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    assert int(count) == 5
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=1e-5)
