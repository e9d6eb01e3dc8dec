"""Buffered asynchronous rounds (``server.mode = async``) deployed: `fedtune server` with real SuperNodes on
loopback (the helpers and the key set of ``test_deploy``), one site slowed by its own setting and one killed."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from tests.integration import test_deploy as deploy
from tests.integration.test_deploy import Processes, node_id, start_federation, wait_for

keyset = deploy.keyset  # the fixtures of the deploy tests
processes = deploy.processes
VERSIONS = 5


def rows_of(run: Path) -> list[dict[str, Any]]:
    return deploy.rows_of(run)


def contributors(row: dict[str, Any]) -> list[int]:
    return [int(c["node"]) for c in row.get("contributors", [])]


def test_async_deployment_drops_a_killed_sites_work_and_finishes_with_a_slowed_site(
    processes: Processes, tmp_path: Path, keyset: Path
) -> None:
    # Prepare: three sites; site 3 slows itself (2 s per local step, its own `--set`), site 2 will be killed
    server, address, run = start_federation(
        processes,
        keyset,
        tmp_path,
        *("--rounds", str(VERSIONS), "--set", "server.mode=async", "--set", "server.buffer-size=2"),
        *("--set", "server.min-clients=3", "--set", "server.round-timeout=60"),
    )
    sites = {}
    for k in (1, 2, 3):
        slow = ("--set", "simulation.site-delays=2") if k == 3 else ()
        sites[k] = processes.start(
            f"client-{k}",
            *("client", "--superlink", address, "--root-cert", str(keyset / "keys" / "ca.pem")),
            *("--auth-key", str(keyset / "keys" / "nodes" / f"node-{k}.key"), "--preset", "tiny", *slow),
        )
    wait_for(lambda: all("SuperNode ID: " in processes.log(f"client-{k}") for k in (1, 2, 3)), 240, "three nodes")
    node = {k: node_id(processes.log(f"client-{k}")) for k in (1, 2, 3)}

    # Execute: once site 2 has contributed to a version, SIGKILL its `fedtune client` (and site worker) group
    wait_for(lambda: any(node[2] in contributors(r) for r in rows_of(run)), 300, "site 2's first contribution")
    os.killpg(sites[2].pid, signal.SIGKILL)
    sites[2].wait(timeout=30)
    published = len(rows_of(run)) - 1  # versions published before the kill; the next is being gathered
    assert server.wait(timeout=400) == 0, processes.log("server")[-3000:]

    # Assert: the run published every version and its summary says so
    rows = rows_of(run)
    assert [r["round"] for r in rows] == list(range(VERSIONS + 1))
    assert [r["version"] for r in rows[1:]] == list(range(1, VERSIONS + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["round"] == summary["rounds"] == VERSIONS and not summary["privacy"].get("stopped")
    assert published + 2 <= VERSIONS, f"site 2 was killed too late to check anything ({published} versions)"
    # a reply site 2 sent before it died may be folded into the version gathered then or the next (it can
    # wait in the server's queue behind one buffer); after those, site 2 contributes to nothing
    for row in rows[published + 2 :]:
        assert node[2] not in contributors(row), row
        assert len(contributors(row)) == 2 and set(contributors(row)) <= {node[1], node[3]}, row
    # its work in flight was dropped: failed (the SuperLink's error reply, or the timeout) or left at the end
    failed = {int(f["node"]) for r in rows for f in r.get("failures", [])}
    assert node[2] in failed or "still training when the run ended" in processes.log("server"), rows
    # site 3 slept per its own setting, and the fast site contributed more often than it
    assert "of `simulation.site-delays`" in processes.log("client-3")
    assert "of `simulation.site-delays`" not in processes.log("client-1")
    counts = Counter(n for r in rows[1:] for n in contributors(r))
    assert counts[node[1]] > counts[node[3]], counts
    # every row has each connected site's idle seconds
    assert all({str(node[1]), str(node[3])} <= set(r["idle_seconds"]) for r in rows[1:]), rows
