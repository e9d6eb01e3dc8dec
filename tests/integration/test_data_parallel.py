"""A data-parallel site (2 processes, gloo on the CPU) replies with the delta of a 1-process site.

Both go through the real ClientApp; the only difference is the site's node config
``train.num-processes = 2``, which makes the ClientApp start a second, resident rank and train with
DDP. Later rounds reuse that rank: no process is started after the first round.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from fedtune.client import channel, edge, ranks
from fedtune.client.app import app as client_app
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.core.arrays import Arrays
from fedtune.model.adapters import adapter_arrays, init_adapter, wrap_lora
from fedtune.model.loading import load_base, pick_device
from fedtune.server.send import round_content
from fedtune.wire import keys
from fedtune.wire.records import read_arrays

NODE = {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}
# 5 examples a micro-batch (uneven shards of 2 and 3 examples of uneven lengths), 2 micro-batches a
# step, 3 steps. FedProx makes the gradient's scale matter, not only its direction; no dropout (each
# rank draws its own masks); a small lr, since AdamW turns fp32 summation-order noise on near-zero
# gradient entries into differences of up to ~lr.
EXACT: dict[str, Any] = {
    "lora.dropout": 0.0,
    "strategy.name": "fedprox",
    "strategy.proximal-mu": 10.0,
    "train.batch-size": 5,
    "train.grad-accum-steps": 2,
    "train.local-steps": 3,
    "train.lr": 1e-3,
    "train.max-grad-norm": 0.0,
}


def train_message(tiny_model: Path, rnd: int = 1, **flat: Any) -> Message:
    """A round-``rnd`` train message whose global adapter has a non-zero B (as after earlier rounds)."""
    cfg = Plan.from_flat({**preset("tiny"), "model.name": str(tiny_model), **flat}).base
    model = wrap_lora(load_base(cfg.model, pick_device("auto")), cfg.lora)
    init_adapter(model, cfg.seed)
    rng = np.random.default_rng(rnd)
    arrays = {
        k: v + (0.05 * rng.standard_normal(v.shape)).astype(np.float32) if "lora_B" in k else v
        for k, v in adapter_arrays(model).items()
    }
    content = round_content(arrays, cfg, rnd)
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN, group_id=str(rnd))


@pytest.fixture(autouse=True)
def no_resident_ranks() -> Iterator[None]:
    """Each test starts and ends without resident data-parallel ranks in this process."""
    ranks.shutdown()
    yield
    ranks.shutdown()


def delta(msg: Message, node_config: dict[str, Any]) -> Arrays:
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return read_arrays(reply.content, keys.DELTA)


@pytest.mark.usefixtures("task_identity")
def test_a_two_process_site_gives_the_delta_of_a_one_process_site(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the settings of EXACT
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned rank inherits it
    msg = train_message(tiny_model, **EXACT)

    # Execute
    single = delta(msg, NODE)
    parallel = delta(msg, {**NODE, "train.num-processes": 2})

    # Assert: the same delta to 1e-5, for a delta far larger than that
    assert single.keys() == parallel.keys() and single
    assert max(float(np.abs(single[k]).max()) for k in single) > 1e-3
    assert max(float(np.abs(single[k] - parallel[k]).max()) for k in single) < 1e-5


def processes_below(pid: int) -> set[tuple[int, float]]:
    """Every live descendant of ``pid`` as (pid, start time): a new process is a new pair."""
    return {(p.pid, p.create_time()) for p in psutil.Process(pid).children(recursive=True)}


@pytest.mark.usefixtures("task_identity")
def test_round_two_reuses_the_resident_rank_and_still_gives_the_one_process_delta(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two rounds with different global adapters and seeds
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    messages = [train_message(tiny_model, rnd, **EXACT) for rnd in (1, 2)]
    single = [delta(msg, NODE) for msg in messages]

    # Execute: round 1 starts the rank; round 2 must only send it work
    first = delta(messages[0], {**NODE, "train.num-processes": 2})
    pool = ranks.resident()
    assert pool is not None
    pids, spawned, before = pool.pids(), ranks.RankPool.spawned, processes_below(os.getpid())
    second = delta(messages[1], {**NODE, "train.num-processes": 2})
    after = processes_below(os.getpid())

    # Assert: no process started during round 2 (by the OS's process table and by the pool's own
    # count), the same rank answered, and each round's delta is the 1-process delta of that round
    assert after == before and len(before) >= 1
    assert ranks.RankPool.spawned == spawned
    assert ranks.resident() is pool and pool.pids() == pids and pool.alive()
    for one, two in zip(single, (first, second), strict=True):
        assert one.keys() == two.keys() and one
        assert max(float(np.abs(one[k] - two[k]).max()) for k in one) < 1e-5
    assert max(float(np.abs(single[0][k] - single[1][k]).max()) for k in single[0]) > 1e-3  # rounds differ

    # Execute: the pool is closed (as the site worker does when it ends)
    ranks.shutdown()

    # Assert: its ranks are gone
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


@pytest.mark.usefixtures("task_identity")
def test_data_parallel_with_dp_sgd_is_refused_at_the_site(tiny_model: Path) -> None:
    # Prepare
    msg = train_message(tiny_model, **{"privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0})
    context = Context(
        run_id=1, node_id=1, node_config={**NODE, "train.num-processes": 2}, state=RecordDict(), run_config={}
    )

    # Execute
    reply = client_app(msg, context)

    # Assert: an error reply naming the key, nothing trained
    assert reply.has_error()
    assert "`train.num-processes` is not supported with `privacy.mechanism` = dp-sgd" in reply.error.reason


def start_worker(directory: Path) -> subprocess.Popen[bytes]:
    """A real site worker process (``python -m fedtune.deploy.worker``), once its socket listens."""
    proc = subprocess.Popen([sys.executable, "-m", "fedtune.deploy.worker", "--dir", str(directory)])
    for _ in range(600):
        if channel.socket_path(directory).exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert proc.poll() is None and channel.socket_path(directory).exists(), "the site worker did not start"
    return proc


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_the_ranks_end_with_the_site_worker(tiny_model: Path, monkeypatch: pytest.MonkeyPatch, stop: int) -> None:
    # Prepare: a site worker that ran one data-parallel round
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    directory = channel.new_private_dir()
    worker = start_worker(directory)
    below: list[psutil.Process] = []
    try:
        node = {**NODE, "train.num-processes": 2, keys.WORKER: str(channel.socket_path(directory))}
        reply = edge.handle(train_message(tiny_model, **EXACT), Context(1, 1, node, RecordDict(), {}))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        below = psutil.Process(worker.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in below]

        # Execute: the worker is stopped (SIGTERM, as `fedtune client` does) or killed outright
        worker.send_signal(stop)
        worker.wait(timeout=60)
        for _ in range(100):  # a killed worker's ranks notice within ranks.JOB_POLL_S
            if not running(below):
                break
            time.sleep(0.1)
        left = running(below)
    finally:
        worker.kill()
        for proc in running(below):  # never leave one behind, even when the test fails
            proc.kill()
        shutil.rmtree(directory, ignore_errors=True)

    # Assert: the worker had its resident rank (a spawned multiprocessing child), and nothing it
    # started outlives it
    assert any("multiprocessing" in c and "spawn_main" in c for c in commands), commands
    assert not left, [p.pid for p in left]
