"""RoLoRA (``lora.alternate``) end to end on the tiny preset (shared backend, real server and ClientApp):
odd rounds send only B, even rounds only A, and each round's FedAvg is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedtune.wire import keys
from tests.integration.test_personalize_e2e import Recorder, adapter_sent, federate, trains


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))


def weighted_mean(stack: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    return np.tensordot(weights / weights.sum(), np.stack(stack).astype(np.float64), axes=1)


def test_alternating_rounds_send_one_factor_and_aggregate_exactly(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    grid = Recorder(3)

    # Execute
    federate(tiny_model, tmp_path / "run", grid, {"lora.alternate": True})

    # Assert: round 1 sends only B, round 2 only A
    first, second = trains(grid, 1), trains(grid, 2)
    start = adapter_sent(first[0][0])
    b_keys = sorted(k for k in start if ".lora_B." in k)
    a_keys = sorted(k for k in start if ".lora_A." in k)
    assert all(sorted(d) == b_keys for _, d, _ in first)
    assert all(sorted(d) == a_keys for _, d, _ in second)
    # numpy reference, round 1: the new global B is the weighted mean of the sites' B, A is unchanged, and
    # the global product B A equals the weighted mean of the sites' products (exact aggregation)
    middle = adapter_sent(second[0][0])
    w1 = np.array([m[keys.NUM_EXAMPLES] for _, _, m in first], dtype=np.float64)
    for b_key in b_keys:
        a_key = b_key.replace(".lora_B.", ".lora_A.")
        local_b = [start[b_key].astype(np.float64) + d[b_key] for _, d, _ in first]
        np.testing.assert_allclose(middle[b_key], weighted_mean(local_b, w1), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(middle[a_key], start[a_key])
        products = [b @ start[a_key].astype(np.float64) for b in local_b]
        np.testing.assert_allclose(
            middle[b_key].astype(np.float64) @ middle[a_key], weighted_mean(products, w1), rtol=1e-4, atol=1e-6
        )
    # round 2: the final A is the weighted mean of the sites' A, B is round 1's
    final = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    w2 = np.array([m[keys.NUM_EXAMPLES] for _, _, m in second], dtype=np.float64)
    for a_key in a_keys:
        local_a = [middle[a_key].astype(np.float64) + d[a_key] for _, d, _ in second]
        np.testing.assert_allclose(final[a_key], weighted_mean(local_a, w2), rtol=1e-5, atol=1e-6)
    for b_key in b_keys:
        np.testing.assert_array_equal(final[b_key], middle[b_key])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_a_plan_alternates_only_in_its_rounds(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    grid = Recorder(3)

    # Execute: plain LoRA in round 1, then RoLoRA (round 2 is even: A; round 3 odd: B)
    federate(tiny_model, tmp_path / "run", grid, {"num-server-rounds": 3, "plan.2-.lora.alternate": True})

    # Assert
    start = adapter_sent(trains(grid, 1)[0][0])
    replies = [d for r in (1, 2, 3) for _, d, _ in trains(grid, r)]
    parts = [{".lora_A." if ".lora_A." in k else ".lora_B." for k in d} for d in replies]
    assert parts == [{".lora_A.", ".lora_B."}] * 3 + [{".lora_A."}] * 3 + [{".lora_B."}] * 3
    assert all(sorted(d) == sorted(start) for _, d, _ in trains(grid, 1))
