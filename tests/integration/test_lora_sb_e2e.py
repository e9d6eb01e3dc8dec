"""LoRA-SB (``peft.method = lora-sb``) end to end on the tiny preset (shared backend, real server and
ClientApp): only the r x r cores travel up, their FedAvg is exact in delta W, the bytes up per round are
the cores' size computed from the base model's module shapes; the fixed A and B travel down once per
site, after which the downlink is the cores alone; a site that lost them refuses one round in one line
and gets them again; and the sites train exactly as from the whole adapter (recomputed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from safetensors.numpy import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from fedtune.client.app import app as client_app
from fedtune.config.presets import preset
from fedtune.model.sb import CORE, fold
from fedtune.simulations.local import LocalGrid
from fedtune.wire import keys
from fedtune.wire.codec import FLOAT32, packed_size
from fedtune.wire.records import encoded_bytes, float32_records, message_bytes, read_arrays
from tests.integration.test_alternate_e2e import weighted_mean
from tests.integration.test_personalize_e2e import Recorder, adapter_sent, federate, trains

SHORT = {"train.local-steps": 2, "train.batch-size": 4, "data.max-eval-examples": 16}  # a short test
LOST = 3  # the node that restarts (loses its context.state) just before its round-2 message


class Restarting(Recorder):
    """The recording shared backend; node ``LOST`` restarts before round 2, and error replies are logged
    with their reason (metrics ``{"error": reason}``, no arrays)."""

    lost = False

    def _handle(self, msg: Message) -> Message:
        node, rnd = msg.metadata.dst_node_id, int(msg.content.config_records[keys.SPEC][keys.ROUND])
        if node == LOST and rnd == 2 and not self.lost:
            self.lost, old = True, self.contexts[node]
            self.contexts[node] = Context(
                run_id=1, node_id=node, node_config=old.node_config, state=RecordDict(), run_config={}
            )
        reply = LocalGrid._handle(self, msg)
        if reply.has_error():
            self.log.append((msg, {}, {"error": reply.error.reason}))
            return reply
        arrays = {k: v.copy() for k, v in read_arrays(reply.content, keys.DELTA).items()}
        self.log.append((msg, arrays, dict(reply.content.metric_records.get(keys.METRICS, {}))))
        return reply


def again(grid: Restarting, msg: Message, whole: dict[str, np.ndarray], kind: str = MessageType.TRAIN) -> Message:
    """The reply of ``msg``'s site, started afresh (a new Context), to the whole adapter ``whole`` with no
    frame named: the message the server sent every round before the frame was cached."""
    node = msg.metadata.dst_node_id
    content = RecordDict({**float32_records(whole, keys.ADAPTER), keys.SPEC: msg.content.config_records[keys.SPEC]})
    fresh = Context(
        run_id=1, node_id=node, node_config=dict(grid.contexts[node].node_config), state=RecordDict(), run_config={}
    )
    return client_app(Message(content, dst_node_id=node, message_type=kind, group_id=msg.metadata.group_id), fresh)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))


def test_only_cores_travel_up_the_frame_down_once_and_their_mean_is_the_mean_delta_w(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Prepare: the targets and rank from the preset, the modules from the base model itself
    grid, out = Restarting(3), tmp_path / "run"
    tiny = preset("tiny")
    r, targets = int(tiny["lora.r"]), str(tiny["lora.target-modules"]).split(",")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    linear = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets}
    modules = list(linear)
    scale = float(tiny["lora.alpha"]) / r

    # Execute: three short rounds; node LOST restarts before round 2
    federate(
        tiny_model,
        out,
        grid,
        {"peft.method": "lora-sb", "eval.federated": False, "num-server-rounds": 3, **SHORT},
    )

    # Assert: every site sends one r x r core per target module, nothing else
    first, second, third = trains(grid, 1), trains(grid, 2), trains(grid, 3)
    ok2 = [e for e in second if "error" not in e[2]]
    start = adapter_sent(first[0][0])
    cores = sorted(k for k in start if CORE in k)
    assert len(cores) == len(modules) and len(first) == len(second) == len(third) == 3 and len(ok2) == 2
    assert all(sorted(d) == cores and all(d[k].shape == (r, r) for k in d) for _, d, _ in first + ok2 + third)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    # the packed float32 wire: one array of r^2 float32 values per module, plus its npy header and index
    assert packed_size({k: (r, r) for k in cores}, FLOAT32) == len(modules) * r * r * 4
    per_site = encoded_bytes({k: (r, r) for k in cores}, FLOAT32)
    assert [row["bytes_up"] for row in rows[1:]] == [3 * per_site, 2 * per_site, 3 * per_site]
    # bytes down, from the base model's module shapes: the frame (A (r, in), B (out, r)) and the cores go to
    # each site once (round 1), then the cores alone, with the frame's SHA-256 (64 hex characters) named
    module_of = {k: k.split(".lora_")[0].removeprefix("base_model.model.") for k in start}
    shapes = {}
    for key, module in module_of.items():
        layer = linear[module]
        shapes[key] = (
            (r, r) if CORE in key else (r, layer.in_features) if ".lora_A." in key else (layer.out_features, r)
        )
    assert {k: v.shape for k, v in start.items()} == shapes
    whole, lean = encoded_bytes(shapes, FLOAT32) + 64, per_site + 64
    assert lean - len(modules) * r * r * 4 < 2_000 and lean < whole / 10
    assert [row["bytes_down"] for row in rows[1:]] == [3 * whole, 3 * lean, 2 * lean + whole]
    for msg, _, _ in first + second + third:
        names = sorted(read_arrays(msg.content, keys.ADAPTER))
        node, rnd = msg.metadata.dst_node_id, int(msg.content.config_records[keys.SPEC][keys.ROUND])
        resent = rnd == 3 and node == LOST
        assert names == (sorted(start) if rnd == 1 or resent else cores), (rnd, node)
        assert message_bytes(msg.content, keys.ADAPTER) == (whole if rnd == 1 or resent else lean)
    # the site that lost the frame refused round 2 in one line, the server went on and re-sent it in round 3
    assert rows[2]["failed"] == 1 and rows[1]["failed"] == rows[3]["failed"] == 0
    (failure,) = rows[2]["failures"]
    assert failure["node"] == LOST and "LoRA-SB: the server sent only the cores" in failure["reason"]
    assert "holds no frame" in failure["reason"] and "\n" not in failure["reason"]
    resent = next(m for m, _, _ in third if m.metadata.dst_node_id == LOST)
    for key, value in adapter_sent(resent).items():
        if CORE not in key:
            np.testing.assert_array_equal(value, start[key])
    # numpy reference, round 1: the factors never move, the new core is the weighted mean of the sites'
    # cores, and the global delta W = s B R A is exactly the weighted mean of the sites' delta W
    frame = {k: v for k, v in start.items() if CORE not in k}
    middle = {**frame, **adapter_sent(second[0][0])}
    w1 = np.array([m[keys.NUM_EXAMPLES] for _, _, m in first], dtype=np.float64)
    for core in cores:
        b = start[core.replace(CORE, ".lora_B.")].astype(np.float64)
        a = start[core.replace(CORE, ".lora_A.")].astype(np.float64)
        local = [start[core].astype(np.float64) + d[core] for _, d, _ in first]
        np.testing.assert_allclose(middle[core], weighted_mean(local, w1), rtol=1e-5, atol=1e-7)
        delta_w = [scale * b @ rr @ a for rr in local]
        np.testing.assert_allclose(scale * b @ middle[core] @ a, weighted_mean(delta_w, w1), rtol=1e-4, atol=1e-6)
    # the sites train exactly as from the whole adapter: each round-2 reply, recomputed by the site started
    # afresh from the whole adapter (no frame cached), is the same to the bit, and so is its evaluation
    for msg, delta, metrics in ok2:
        reply = again(grid, msg, middle)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        recomputed = read_arrays(reply.content, keys.DELTA)
        assert sorted(recomputed) == cores
        for key in cores:
            np.testing.assert_array_equal(recomputed[key], delta[key], err_msg=key)
        assert reply.content.metric_records[keys.METRICS][keys.TRAIN_LOSS] == metrics[keys.TRAIN_LOSS]
    node = second[0][0].metadata.dst_node_id  # holds the frame: the cores alone complete its adapter
    evaluate = Message(second[0][0].content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id="2")
    cached, plain = client_app(evaluate, grid.contexts[node]), again(grid, evaluate, middle, MessageType.EVALUATE)
    assert not cached.has_error() and not plain.has_error()
    loss = [m.content.metric_records[keys.METRICS][keys.EVAL_LOSS] for m in (cached, plain)]
    assert loss[0] == loss[1]
    # rounds 2 and 3 against the weighted mean of their replies; the output is the final state with each
    # core folded into its B: a vanilla LoRA adapter
    after = {**frame, **{k: v for k, v in adapter_sent(third[0][0]).items() if CORE in k}}
    expected = dict(after)
    for replies, before, check in ((ok2, middle, after), (third, after, expected)):
        weights = np.array([m[keys.NUM_EXAMPLES] for _, _, m in replies], dtype=np.float64)
        for core in cores:
            mean = weighted_mean([before[core].astype(np.float64) + d[core] for _, d, _ in replies], weights)
            if check is after:
                np.testing.assert_allclose(after[core], mean, rtol=1e-5, atol=1e-7)
            else:
                expected[core] = mean
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    folded = fold(expected)
    assert sorted(final) == sorted(folded) and not any(CORE in k for k in final)
    for key, value in folded.items():
        np.testing.assert_allclose(final[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
