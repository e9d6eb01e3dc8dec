"""LoRA-SB (``peft.method = lora-sb``) end to end on the tiny preset (shared backend, real server and
ClientApp): only the r x r cores travel up, their FedAvg is exact in delta W, and the bytes up per round
are the cores' size computed from the base model's module shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from fedtune.config.presets import preset
from fedtune.model.sb import CORE, fold
from fedtune.wire import keys
from fedtune.wire.codec import FLOAT32, packed_size
from fedtune.wire.records import encoded_bytes
from tests.integration.test_alternate_e2e import weighted_mean
from tests.integration.test_personalize_e2e import Recorder, adapter_sent, federate, trains


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))


def test_only_cores_travel_and_their_mean_is_the_mean_delta_w(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare: the targets and rank from the preset, the modules from the base model itself
    grid, out = Recorder(3), tmp_path / "run"
    tiny = preset("tiny")
    r, targets = int(tiny["lora.r"]), str(tiny["lora.target-modules"]).split(",")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    modules = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    scale = float(tiny["lora.alpha"]) / r

    # Execute
    federate(tiny_model, out, grid, {"peft.method": "lora-sb", "eval.federated": False})

    # Assert: every site sends one r x r core per target module, nothing else
    first, second = trains(grid, 1), trains(grid, 2)
    start, middle = adapter_sent(first[0][0]), adapter_sent(second[0][0])
    cores = sorted(k for k in start if CORE in k)
    assert len(cores) == len(modules) and len(first) == 3
    assert all(sorted(d) == cores and all(d[k].shape == (r, r) for k in d) for _, d, _ in first + second)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the packed float32 wire: one array of r^2 float32 values per module, plus its npy header and index
    assert packed_size({k: (r, r) for k in cores}, FLOAT32) == len(modules) * r * r * 4
    per_site = encoded_bytes({k: (r, r) for k in cores}, FLOAT32)
    assert [row["bytes_up"] for row in rows[1:]] == [3 * per_site, 3 * per_site]
    # numpy reference, round 1: the factors never move, the new core is the weighted mean of the sites'
    # cores, and the global delta W = s B R A is exactly the weighted mean of the sites' delta W
    w1 = np.array([m[keys.NUM_EXAMPLES] for _, _, m in first], dtype=np.float64)
    for key in start:
        if CORE not in key:
            np.testing.assert_array_equal(middle[key], start[key])
    for core in cores:
        b = start[core.replace(CORE, ".lora_B.")].astype(np.float64)
        a = start[core.replace(CORE, ".lora_A.")].astype(np.float64)
        local = [start[core].astype(np.float64) + d[core] for _, d, _ in first]
        np.testing.assert_allclose(middle[core], weighted_mean(local, w1), rtol=1e-5, atol=1e-7)
        delta_w = [scale * b @ rr @ a for rr in local]
        np.testing.assert_allclose(scale * b @ middle[core] @ a, weighted_mean(delta_w, w1), rtol=1e-4, atol=1e-6)
    # the output is the final state with each core folded into its B: a vanilla LoRA adapter
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    w2 = np.array([m[keys.NUM_EXAMPLES] for _, _, m in second], dtype=np.float64)
    expected = dict(middle)
    for core in cores:
        expected[core] = weighted_mean([middle[core].astype(np.float64) + d[core] for _, d, _ in second], w2)
    folded = fold(expected)
    assert sorted(final) == sorted(folded) and not any(CORE in k for k in final)
    for key, value in folded.items():
        np.testing.assert_allclose(final[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
