"""LoRA-SB's frame (the fixed A and B) travels down once: its fingerprint, the packed subset the cores travel
in, the server's "who holds the frame" bookkeeping and the site's accept / refuse logic; then the async
path (a virtual-clock grid whose sites keep the frame in their own Context) end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from safetensors.numpy import load_file, save_file

from fedtune.client import frame as site_frame
from fedtune.config.plan import Plan
from fedtune.core.errors import ConfigError
from fedtune.model.sb import CORE, fingerprint, frame_of
from fedtune.server import frame, loop, traffic
from fedtune.server.state import ServerState
from fedtune.wire import keys
from fedtune.wire.codec import SCHEMES, Scheme, rng_for
from fedtune.wire.records import (
    decode,
    encode,
    encoded_bytes,
    float32_records,
    message_bytes,
    read_arrays,
    select_records,
)
from tests.unit import test_buffered

R, IN, OUT = 2, 6, 5


def sb_adapter(seed: int = 0, modules: int = 2) -> dict[str, np.ndarray]:
    """A LoRA-SB adapter's shape: per module A (r, in), B (out, r), the r x r core."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in range(modules):
        out[f"m{m}.lora_A.weight"] = rng.normal(size=(R, IN)).astype(np.float32)
        out[f"m{m}.lora_B.weight"] = rng.normal(size=(OUT, R)).astype(np.float32)
        out[f"m{m}{CORE}weight"] = rng.normal(size=(R, R)).astype(np.float32)
    return out


def state_of(arrays: dict[str, np.ndarray]) -> ServerState:
    return ServerState(round=0, global_arrays=arrays, rng=np.random.default_rng(0))


def test_the_fingerprint_names_the_frame_bit_for_bit_and_nothing_else() -> None:
    # Prepare
    arrays = sb_adapter()
    base = frame.frame_fingerprint(arrays)
    nudged = dict(arrays)
    key = "m1.lora_B.weight"
    nudged[key] = arrays[key].copy()
    nudged[key][0, 0] = np.nextafter(nudged[key][0, 0], np.float32(np.inf))  # one ulp

    # Assert: order and cores do not matter; one ulp, a name or a shape does; a plain LoRA adapter has none
    assert base is not None and len(base) == 64
    assert frame.frame_fingerprint(dict(reversed(list(arrays.items())))) == base
    assert frame.frame_fingerprint({**arrays, f"m0{CORE}weight": np.zeros((R, R), np.float32)}) == base
    assert frame.frame_fingerprint(nudged) != base
    renamed = {k.replace("m1.", "m9."): v for k, v in arrays.items()}
    assert frame.frame_fingerprint(renamed) != base
    reshaped = {**arrays, key: arrays[key].reshape(R, OUT)}
    assert frame.frame_fingerprint(reshaped) != base
    assert fingerprint(frame_of(arrays)) == base
    assert frame.frame_fingerprint(frame_of(arrays)) is None  # no cores: not LoRA-SB


@pytest.mark.parametrize("name", SCHEMES)
def test_a_selected_subset_decodes_to_exactly_the_full_encodings_values(name: str) -> None:
    # Prepare: every scheme, the full adapter encoded once
    scheme = Scheme(name, 4, 0.3) if name != "float32" else Scheme.of(Plan.from_flat({}).base.compression, "downlink")
    arrays = sb_adapter(1, modules=3)
    records, _ = encode(arrays, keys.ADAPTER, scheme, rng_for(0, 1, "server"))
    cores = [k for k in arrays if CORE in k]

    # Execute
    lean = select_records(records, keys.ADAPTER, cores)

    # Assert: the same values as the full encoding's (a reference decode), and the size of encoding them alone
    full = decode(RecordDict(records), keys.ADAPTER, scheme)
    got = decode(RecordDict(lean), keys.ADAPTER, scheme)
    assert list(got) == cores
    for key in cores:
        np.testing.assert_array_equal(got[key], full[key])
    alone, _ = encode({k: arrays[k] for k in cores}, keys.ADAPTER, scheme, rng_for(0, 1, "server"))
    assert message_bytes(RecordDict(lean), keys.ADAPTER) == message_bytes(RecordDict(alone), keys.ADAPTER)


def test_the_server_sends_the_frame_once_per_node_and_again_after_a_failure(task_identity: None) -> None:
    # Prepare
    arrays = sb_adapter()
    cfg = Plan.from_flat({}).base
    state = state_of(arrays)
    fp = frame.frame_fingerprint(arrays)
    cores = sorted(k for k in arrays if CORE in k)

    def sent(node: int) -> tuple[list[str], int]:
        records = traffic.Downlink(cfg, state, 1).records(node)
        assert records[keys.WIRE][keys.FRAME] == fp  # type: ignore[index]
        content = RecordDict(records)
        return sorted(read_arrays(content, keys.ADAPTER)), message_bytes(content, keys.ADAPTER)

    # Execute / Assert: first message the frame, then the cores; projected bytes are what is sent
    projected_first = traffic.projected_bytes(cfg, state, [1], [1])
    first, first_bytes = sent(1)
    second, second_bytes = sent(1)
    assert first == sorted(arrays) and second == cores
    up = encoded_bytes({k: (R, R) for k in cores}, Scheme.of(cfg.compression, "uplink"))
    assert projected_first == first_bytes + up + second_bytes  # train then eval in one round: the frame once
    assert traffic.projected_bytes(cfg, state, [1], []) == second_bytes + up
    shapes = {k: v.shape for k, v in arrays.items()}
    down = Scheme.of(cfg.compression, "downlink")
    assert first_bytes == encoded_bytes(shapes, down) + len(fp or "")  # the index names the fingerprint too
    assert second_bytes == encoded_bytes({k: shapes[k] for k in cores}, down) + len(fp or "")
    # an error reply, or none, forgets the node: its next adapter carries the frame again
    msgs = {n: Message(RecordDict(), dst_node_id=n, message_type="train", group_id="1") for n in (1, 2, 3)}
    sent(2), sent(3)
    error = Message(Error(code=1, reason="x"), reply_to=msgs[1])
    ok = Message(RecordDict({keys.METRICS: MetricRecord({})}), reply_to=msgs[2])
    replies = list(frame.watch(iter([(1, error), (2, ok)]), [1, 2, 3], state.frame_holders))
    assert [n for n, _ in replies] == [1, 2]
    assert state.frame_holders == {2: fp}
    assert sent(1)[0] == sorted(arrays) and sent(2)[0] == cores and sent(3)[0] == sorted(arrays)
    # a new frame (another fingerprint) goes to everyone
    changed = {**arrays, "m0.lora_A.weight": arrays["m0.lora_A.weight"] * 2}
    state.global_arrays = changed
    assert sorted(read_arrays(RecordDict(traffic.Downlink(cfg, state, 2).records(2)), keys.ADAPTER)) == sorted(arrays)


def test_a_plain_lora_adapter_always_travels_whole_and_names_no_frame(task_identity: None) -> None:
    arrays = frame_of(sb_adapter())
    state = state_of(arrays)
    downlink = traffic.Downlink(Plan.from_flat({}).base, state, 1)
    for _ in range(2):
        records = downlink.records(1)
        assert keys.FRAME not in records[keys.WIRE] and sorted(
            read_arrays(RecordDict(records), keys.ADAPTER)
        ) == sorted(arrays)  # type: ignore[operator]
    assert state.frame_holders == {}


def test_a_quantized_downlink_sends_cores_that_decode_to_the_adopted_global(task_identity: None) -> None:
    # Prepare: int8 downlink; the server adopts what the sites decode
    cfg = Plan.from_flat({"compression.downlink": "int8", "compression.block-size": 4}).base
    state = state_of(sb_adapter(2))
    state.global_arrays = traffic.received_adapter(cfg, state, 1)
    scheme = Scheme.of(cfg.compression, "downlink")
    downlink = traffic.Downlink(cfg, state, 1)

    # Execute
    whole = decode(RecordDict(downlink.records(1)), keys.ADAPTER, scheme)
    lean = decode(RecordDict(downlink.records(1)), keys.ADAPTER, scheme)

    # Assert: bit for bit the adopted adapter, whole or cores alone
    for key, value in state.global_arrays.items():
        np.testing.assert_array_equal(whole[key], value)
        if CORE in key:
            np.testing.assert_array_equal(lean[key], value)
    assert sorted(lean) == sorted(k for k in whole if CORE in k)


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_a_site_keeps_a_checked_frame_and_refuses_cores_it_cannot_complete() -> None:
    # Prepare
    arrays = sb_adapter()
    fp = fingerprint(frame_of(arrays))
    assert fp is not None
    cores = {k: v for k, v in arrays.items() if CORE in k}
    site = context()

    # Execute / Assert: a whole adapter with its fingerprint: taken as it is, its frame to keep
    whole, received = site_frame.adapter(arrays, {keys.FRAME: fp}, site)
    assert (
        whole is arrays
        and received is not None
        and received[0] == fp
        and sorted(received[1]) == sorted(frame_of(arrays))
    )
    # cores alone before the site holds the frame: one line naming LoRA-SB and why
    with pytest.raises(ConfigError, match=r"^LoRA-SB: the server sent only the cores.*holds no frame[^\n]*$"):
        site_frame.adapter(cores, {keys.FRAME: fp}, site)
    site_frame.keep(site, received)
    completed, again = site_frame.adapter(cores, {keys.FRAME: fp}, site)
    assert again is None and sorted(completed) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(completed[key], value)
    # another frame named than the one held; a frame that does not match its fingerprint; a bad entry
    with pytest.raises(ConfigError, match=f"holds frame {fp[:12]}"):
        site_frame.adapter(cores, {keys.FRAME: "0" * 64}, site)
    tampered = {**arrays, "m0.lora_A.weight": arrays["m0.lora_A.weight"] + 1}
    with pytest.raises(ConfigError, match="do not match their fingerprint"):
        site_frame.adapter(tampered, {keys.FRAME: fp}, site)
    with pytest.raises(ConfigError, match="fingerprint string"):
        site_frame.adapter(arrays, {keys.FRAME: 7}, site)
    # no fingerprint named (plain LoRA, a user's tool): the adapter as it is
    assert site_frame.adapter(cores, {}, context()) == (cores, None)


def test_a_site_with_a_state_dir_completes_the_cores_after_a_restart(tmp_path: Path) -> None:
    # Prepare: a deployed site (`fedtune client --state-dir`) that received and kept the frame
    arrays = sb_adapter()
    fp = fingerprint(frame_of(arrays))
    cores = {k: v for k, v in arrays.items() if CORE in k}
    config = {keys.STATE_DIR: str(tmp_path / "state")}

    def site() -> Context:  # a fresh process: an empty context.state, the same node config
        return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})

    _, received = site_frame.adapter(arrays, {keys.FRAME: fp}, first := site())
    assert received is not None
    site_frame.keep(first, received)
    (kept,) = (tmp_path / "state").iterdir()

    # Execute: the restarted site gets the cores alone
    completed, again = site_frame.adapter(cores, {keys.FRAME: fp}, site())

    # Assert: completed from the file, value for value as the whole adapter, and the file is the frame
    assert kept.name == f"sb-frame-{fp}.safetensors" and again is None
    assert sorted(completed) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(completed[key], value)
    assert not [p for p in (tmp_path / "state").iterdir() if p.name.startswith(".")]  # no temp file left
    # a kept file that does not match its fingerprint: one line naming it; without a state dir, no file
    frame_arrays = load_file(str(kept))
    frame_arrays[sorted(frame_arrays)[0]] += 1
    save_file(frame_arrays, str(kept))
    with pytest.raises(ConfigError, match=f"^LoRA-SB: the kept fixed A and B {kept} do not match their fingerprint"):
        site_frame.adapter(cores, {keys.FRAME: fp}, site())
    site_frame.keep(site(), received)  # the server sends the frame again after that refusal: the file is mended
    assert site_frame.adapter(cores, {keys.FRAME: fp}, site())[0].keys() == arrays.keys()
    plain = context()
    site_frame.keep(plain, received)
    assert site_frame.frame_path(plain, fp) is None and len(list((tmp_path / "state").iterdir())) == 1
    assert site_frame.frame_path(site(), "../" + fp[3:]) is None  # a name from the server is never a path


class FrameSites(test_buffered.VirtualGrid):
    """The async test's virtual-clock grid, over a LoRA-SB adapter: each node completes what it receives
    with the real site logic and its own Context (node 3's is lost after its first reply), answers with an
    error when it cannot, and otherwise sends a delta over the cores."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts = {n: context() for n in test_buffered.DURATION}
        self.received: list[tuple[int, list[str], dict[str, np.ndarray]]] = []

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        arrays = read_arrays(msg.content, keys.ADAPTER)
        try:
            whole, received = site_frame.adapter(arrays, msg.content.config_records[keys.WIRE], self.contexts[node])
        except ConfigError as exc:
            self.received.append((node, sorted(arrays), {}))
            return Message(Error(code=1, reason=str(exc)), reply_to=msg)
        if received is not None:
            site_frame.keep(self.contexts[node], received)
        self.received.append((node, sorted(arrays), whole))
        if node == 3 and len([r for r in self.received if r[0] == 3]) == 1:
            self.contexts[3] = context()  # a restarted site
        delta = {k: (node - 0.5 * v).astype(np.float32) for k, v in whole.items() if CORE in k}
        metrics = MetricRecord({keys.TRAIN_LOSS: float(node), keys.NUM_EXAMPLES: 10 * node})
        return Message(RecordDict({**float32_records(delta, keys.DELTA), keys.METRICS: metrics}), reply_to=msg)


def test_async_sends_the_frame_once_per_site_and_again_to_one_that_lost_it(task_identity: None) -> None:
    # Prepare
    base: dict[str, Any] = {"server.mode": "async", "server.min-clients": 3, "server.buffer-size": 2}
    plan = Plan.from_flat({**base, "eval.federated": False, "num-server-rounds": 16})
    grid, rows = FrameSites(), []
    start = sb_adapter(3)
    state = state_of(dict(start))

    # Execute
    state = loop.run(plan, grid, state, evaluate=lambda a, c: {}, on_round=lambda s, r: rows.append(r.to_json()))

    # Assert: each node's first message carries the frame, later ones the cores alone; node 3 lost its
    # frame, refused the cores in one line, got the frame again and trained from it
    everything, cores = sorted(start), sorted(k for k in start if CORE in k)
    for node in (1, 2):
        got = [names for n, names, _ in grid.received if n == node]
        assert got[0] == everything and all(names == cores for names in got[1:]) and len(got) > 2
    third = [(names, whole) for n, names, whole in grid.received if n == 3]
    assert [names for names, _ in third[:3]] == [everything, cores, everything]
    assert third[1][1] == {}  # refused
    failures = [f for row in rows for f in row.get("failures") or []]
    assert [f["node"] for f in failures] == [3] and "LoRA-SB: the server sent only the cores" in failures[0]["reason"]
    # every site trained from the server's frame: the whole adapter each one used holds the fixed A and B
    for _, _, whole in grid.received:
        for key in (k for k in whole if CORE not in k):
            np.testing.assert_array_equal(whole[key], start[key])
    for key in everything:
        if CORE not in key:
            np.testing.assert_array_equal(state.global_arrays[key], start[key])
