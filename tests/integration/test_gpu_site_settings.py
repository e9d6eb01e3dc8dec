"""A site's own GPU settings (node config) reach its trainer through the real ClientApp, and a
setting the site's machine cannot run comes back as an error reply naming the key and the site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from fedtune.client import app as client_module
from fedtune.client.app import app as client_app
from fedtune.config import TrainConfig
from tests.integration.test_data_parallel import NODE, train_message


def context(node_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


@pytest.mark.usefixtures("task_identity")
def test_a_sites_precision_device_and_accumulation_reach_its_trainer(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record what the ClientApp hands to the (real) trainer
    seen: list[tuple[TrainConfig, str]] = []
    real = client_module.train_local

    def recording(model: Any, examples: Any, cfg: TrainConfig, **kw: Any) -> Any:
        seen.append((cfg, next(model.parameters()).device.type))
        return real(model, examples, cfg, **kw)

    monkeypatch.setattr(client_module, "train_local", recording)
    msg = train_message(tiny_model)  # the server's spec: fp32, no accumulation, no checkpointing
    own = {"train.device": "cpu", "train.precision": "bf16", "train.grad-accum-steps": 2}
    own["train.gradient-checkpointing"] = True

    # Execute
    reply = client_app(msg, context({**NODE, **own}))

    # Assert: the site's settings won over the spec, and it trained on its device
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    cfg, device = seen[0]
    assert (cfg.precision, cfg.grad_accum_steps, cfg.gradient_checkpointing, cfg.device) == ("bf16", 2, True, "cpu")
    assert device == "cpu"


@pytest.mark.usefixtures("task_identity")
def test_a_site_that_cannot_quantize_replies_with_one_line_naming_it(tiny_model: Path) -> None:
    # Execute
    own = {"train.device": "cpu", "model.quantization": "4bit"}
    reply = client_app(train_message(tiny_model), context({**NODE, **own}))

    # Assert
    assert reply.has_error()
    assert reply.error.reason == (
        "`model.quantization` = 4bit at site 0 needs a CUDA GPU (bitsandbytes), but `train.device` is cpu."
    )
