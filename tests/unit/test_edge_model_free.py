"""A deployed ClientApp process without a site worker answers SecAgg+'s share and unmask stages without
importing the training stack (torch, transformers, peft, opacus): those stages need no model or data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "opacus", "datasets")

# Runs in a fresh interpreter, as Flower's per-message `flwr-clientapp` process would: one stage message
# from a site that holds no state for the round, through the edge's handler, with no worker configured.
SCRIPT = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedtune.client import edge
from fedtune.wire import keys

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7  # as flwr-clientapp sets them

action = sys.argv[1]
content = RecordDict({keys.SECAGG: ConfigRecord({keys.ROUND: 4})})
msg = Message(content, dst_node_id=7, message_type=f"query.{action}")
context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
try:
    reply = edge.handle(msg, context)
    error = reply.error.reason if reply.has_error() else None
except Exception as exc:  # the full app raising on this bare message still shows what it imported
    error = repr(exc)
print(json.dumps({
    "error": error,
    "heavy": sorted(m for m in HEAVY_NAMES if m in sys.modules),
}))
""".replace("HEAVY_NAMES", repr(HEAVY))


@pytest.mark.parametrize("action", ["secagg_share", "secagg_unmask"])
def test_share_and_unmask_stages_run_without_the_training_stack(action: str) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, action], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # the stage ran (the site's own refusal: it never advertised keys for round 4) ...
    assert out["error"] is not None and "no secure-aggregation state for round 4" in out["error"]
    # ... and nothing of the training stack was imported to run it
    assert out["heavy"] == []


def test_other_messages_without_a_worker_still_reach_the_full_client_app() -> None:
    """The key-advertising stage opens the site's data: it goes to fedtune.client.app, which loads torch."""
    script = SCRIPT.replace("keys.SECAGG: ConfigRecord({keys.ROUND: 4})", "")
    done = subprocess.run([sys.executable, "-c", script, "secagg_keys"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["error"] is not None  # no round spec: refused or raised
    assert "torch" in out["heavy"]
