"""A site's own GPU settings (node config) reach its trainer through the real ClientApp, a setting
the site's machine cannot run comes back as an error reply naming the key and the site, and a
dp-sgd site accounts an accumulated batch at its true sample rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from fedtune.client import pipeline as client_module
from fedtune.client.app import app as client_app
from fedtune.client.site import open_site
from fedtune.config import RunConfig, TrainConfig
from fedtune.config.presets import preset
from fedtune.wire import keys
from tests.integration.test_data_parallel import NODE, train_message
from tests.integration.test_privacy_e2e import opacus_epsilon


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


@pytest.mark.usefixtures("task_identity")
def test_a_dp_sgd_site_accounts_the_accumulated_batch(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: expected Poisson batch 2 x 3 = 6 examples a step
    flat = {"privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0, "train.batch-size": 2}
    msg = train_message(tiny_model, **{**flat, "train.grad-accum-steps": 3})
    node = {**NODE, keys.STATE_DIR: str(tmp_path)}
    cfg = RunConfig.from_flat({**preset("tiny"), "model.name": str(tiny_model), **flat})
    n = len(open_site(cfg, NODE).train)

    # Execute
    reply = client_app(msg, context(node))

    # Assert: the epsilon Opacus gives for q = 6 / n over the round's steps
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content.metric_records[keys.METRICS]
    expected = opacus_epsilon([(1.0, min(1.0, 6 / n), int(metrics[keys.STEPS]))])
    assert metrics[keys.EPSILON] == pytest.approx(expected, rel=1e-6)
