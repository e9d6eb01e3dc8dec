"""GPU sites on CUDA: bf16/fp16 autocast, QLoRA (4-bit base through bitsandbytes), gradient
checkpointing, a whole GPU site through the ClientApp, and data parallel over NCCL.

Every test here carries the ``gpu`` marker: ``tests/conftest.py`` deselects them when
``torch.cuda.is_available()`` is False (and those needing more GPUs than there are), so a CPU run
lists them as deselected, never as skipped or passed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedtune.client.app import app as client_app
from fedtune.config import TrainConfig
from fedtune.wire import keys
from fedtune.wire.records import read_arrays
from tests.integration.test_data_parallel import EXACT, NODE, delta, train_message
from tests.unit.test_trainer import delta_after, max_abs, site_setup

pytestmark = pytest.mark.gpu


def cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    x, y = (np.concatenate([d[k].ravel() for k in sorted(d)]) for d in (a, b))
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_training_on_cuda(tiny_model: Path, precision: str) -> None:
    # Prepare: an fp32 base on the GPU; record the dtype q_proj computes in
    model, examples, start = site_setup(tiny_model, device="cuda", dtype="float32")
    dtypes: set[torch.dtype] = set()
    proj = model.get_base_model().model.layers[0].self_attn.q_proj
    hook = proj.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    cfg = TrainConfig(batch_size=4, local_steps=2, lr=1e-3, precision=precision)  # type: ignore[arg-type]

    # Execute
    try:
        mixed = delta_after(model, examples, start, cfg)
        reference = delta_after(model, examples, start, dataclasses.replace(cfg, precision="fp32"))
    finally:
        hook.remove()

    # Assert: half-precision compute, fp32 adapter, an update close in direction to the fp32 one
    assert {torch.bfloat16 if precision == "bf16" else torch.float16} <= dtypes
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(np.isfinite(v).all() for v in mixed.values()) and max_abs(mixed) > 1e-4
    assert cosine(mixed, reference) > 0.9


def test_qlora_4bit_base_loads_and_takes_two_local_steps(tiny_model: Path) -> None:
    # Prepare: the base quantized to NF4 by bitsandbytes, prepared by PEFT for k-bit training
    import bitsandbytes as bnb

    model, examples, start = site_setup(tiny_model, device="cuda", quantization="4bit")
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    frozen = q_proj.base_layer.weight.detach().clone()

    # Execute
    delta = delta_after(model, examples, start, TrainConfig(batch_size=4, local_steps=2, lr=1e-3, precision="bf16"))

    # Assert: a 4-bit frozen base, unchanged; a finite, non-zero fp32 adapter update
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert torch.equal(q_proj.base_layer.weight, frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(np.isfinite(v).all() for v in delta.values()) and max_abs(delta) > 1e-4


def test_gradient_checkpointing_on_cuda_gives_the_same_delta(tiny_model: Path) -> None:
    # Prepare
    model, examples, start = site_setup(tiny_model, device="cuda", dtype="float32")
    cfg = TrainConfig(batch_size=4, local_steps=2, lr=1e-3)

    # Execute
    plain = delta_after(model, examples, start, cfg)
    checkpointed = delta_after(model, examples, start, dataclasses.replace(cfg, gradient_checkpointing=True))

    # Assert
    assert max_abs(plain) > 1e-4
    assert max_abs(plain, checkpointed) < 1e-5


@pytest.mark.usefixtures("task_identity")
def test_a_qlora_gpu_site_through_the_clientapp(tiny_model: Path) -> None:
    # Prepare: every GPU setting chosen by the site in its node config
    own = {
        "train.device": "cuda",
        "model.quantization": "4bit",
        "train.precision": "bf16",
        "train.gradient-checkpointing": True,
        "train.grad-accum-steps": 2,
    }
    context = Context(run_id=1, node_id=1, node_config={**NODE, **own}, state=RecordDict(), run_config={})

    # Execute
    reply = client_app(train_message(tiny_model), context)

    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    update = read_arrays(reply.content, keys.DELTA)
    assert all(np.isfinite(v).all() for v in update.values()) and max_abs(update) > 0


@pytest.mark.gpu(min_devices=2)
@pytest.mark.usefixtures("task_identity")
def test_a_two_gpu_site_over_nccl_gives_the_delta_of_a_one_gpu_site(tiny_model: Path) -> None:
    # Prepare: as the CPU test (tests/integration/test_data_parallel.py), on CUDA with NCCL
    msg = train_message(tiny_model, **EXACT, **{"model.dtype": "float32"})
    node = {**NODE, "train.device": "cuda"}

    # Execute
    single = delta(msg, node)
    parallel = delta(msg, {**node, "train.num-processes": 2})

    # Assert
    assert max(float(np.abs(single[k]).max()) for k in single) > 1e-3
    assert max(float(np.abs(single[k] - parallel[k]).max()) for k in single) < 1e-5
