"""Each site's idle seconds: a synchronous round's wait for its slowest reply, and the round table's async
columns (version, contributors with their staleness, idle)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedtune.config.plan import Plan
from fedtune.server import loop, plain_round
from fedtune.server.record import Contribution, RoundRecord
from fedtune.server.report.table import COLUMNS, columns, markdown
from fedtune.server.state import ServerState
from fedtune.server.timing import waited_for_slowest
from tests.unit.test_buffered import DURATION, GLOBAL, VirtualGrid
from tests.unit.test_loop import CENTRAL, FakeGrid, clipped, run_loop


def test_each_replied_site_waits_from_its_reply_until_the_slowest_one() -> None:
    # Prepare: seven sites' reply times
    rng = np.random.default_rng(3)
    arrivals = rng.uniform(100.0, 160.0, size=7)
    replied = {node: float(t) for node, t in zip(range(11, 18), arrivals, strict=True)}

    # Execute: everyone replied (the round ends with the slowest), and a round that waited for a timeout at 200
    idle = waited_for_slowest(replied, max(replied.values()))
    timed_out = waited_for_slowest(replied, 200.0)

    # Assert: numpy's end - t per site, to the millisecond; the slowest site waited for nobody
    np.testing.assert_allclose([idle[n] for n in range(11, 18)], arrivals.max() - arrivals, atol=5e-4)
    np.testing.assert_allclose([timed_out[n] for n in range(11, 18)], 200.0 - arrivals, atol=5e-4)
    assert idle[11 + int(arrivals.argmax())] == 0.0
    assert list(idle) == sorted(replied) and waited_for_slowest({}, 5.0) == {}


def test_the_async_table_shows_the_version_its_contributors_staleness_and_idle_seconds() -> None:
    # Prepare
    record = RoundRecord(round=3, version=3, contributors=[Contribution(1, 0), Contribution(2, 2)])
    record.idle_seconds = {1: 0.25, 2: 1.5, 3: 4.0}

    # Execute
    table = markdown([RoundRecord(round=0), record], columns(asynchronous=True))

    # Assert: after `round`; round 0 has none of them; idle is the sum over the sites
    header, _, first, third = table.splitlines()
    assert header.startswith("| round | version | contributors | idle | sampled |")
    assert first.startswith("| 0 | - | - | - | 0 |")
    assert third.startswith("| 3 | 3 | 1@0 2@2 | 5.8 | 0 |")
    assert columns() == COLUMNS  # a sync run's table is unchanged


def test_a_sync_round_on_the_real_loop_records_each_sites_wait_for_the_slowest(
    task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the virtual-clock grid of the async tests (node 3 takes 5 s, the others 1 s), one sync round
    grid = VirtualGrid()
    monkeypatch.setattr(plain_round, "now", lambda: grid.now)
    plan = Plan.from_flat({"server.min-clients": 3, "eval.federated": False, "num-server-rounds": 2})
    state = ServerState(round=0, global_arrays=dict(GLOBAL), rng=np.random.default_rng(0))
    rows: list[dict[str, Any]] = []

    # Execute
    loop.run(plan, grid, state, evaluate=lambda a, c: {}, on_round=lambda s, r: rows.append(r.to_json()))

    # Assert: every site is pushed at once; each waits from its own finish until the slowest's
    expected = {str(n): float(max(DURATION.values()) - d) for n, d in DURATION.items()}
    assert [r["idle_seconds"] for r in rows[1:]] == [expected, expected]
    assert "idle_seconds" not in rows[0]  # round 0 trains nobody


def test_under_dp_a_sync_round_records_no_idle_seconds(task_identity: None) -> None:
    # Prepare: a site's seconds follow its data under DP (Poisson batches), so its idle seconds are not recorded
    plans = {m: Plan.from_flat({"num-server-rounds": 1, **(CENTRAL if m == "dp" else {})}) for m in ("none", "dp")}

    # Execute
    rows = {m: run_loop(plan, FakeGrid([1, 2, 3], clipped))[1][1] for m, plan in plans.items()}

    # Assert
    assert set(rows["none"]["idle_seconds"]) == {"1", "2", "3"}
    assert "idle_seconds" not in rows["dp"]
