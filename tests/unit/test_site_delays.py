"""``simulation.site-delays``: the shared grid holds a slowed site's reply while the next sites compute, and a
site sleeps itself only where no grid holds its reply (Ray, deployment)."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune.client.slowdown import site_delay
from fedtune.config import RunConfig
from fedtune.config.fields import parse_assignments
from fedtune.deploy.client import site_settings
from fedtune.simulations.local import LocalGrid
from fedtune.wire import keys

DELAYS = {"simulation.site-delays": "0.2,0"}  # partition 0 (node 1): 0.2 s per step, 3 steps


def answer(msg: Message, context: Context) -> Message:
    return Message(RecordDict({keys.METRICS: MetricRecord({keys.STEPS: 3})}), reply_to=msg)


def train_message(node: int) -> Message:
    spec = ConfigRecord({**DELAYS, keys.ROUND: 1})
    return Message(RecordDict({keys.SPEC: spec}), dst_node_id=node, message_type="train")


def test_the_slowed_sites_reply_comes_after_the_next_sites_reply(task_identity: None) -> None:
    # Prepare
    grid = LocalGrid(answer, 2)
    first, second = grid.push_messages([train_message(1), train_message(2)])

    # Execute: pull until both came back
    order: list[str] = []
    while len(order) < 2:
        order += [r.metadata.reply_to_message_id for r in grid.pull_messages({first, second} - set(order))]

    # Assert: node 1 was sent first but is slowed, so node 2 answers first; node 1 is not lost
    assert order == [second, first]
    assert not grid.held and not grid.pending


def test_a_site_sleeps_itself_only_without_a_grid_that_holds_its_reply() -> None:
    cfg = RunConfig.from_flat(DELAYS)
    assert site_delay(cfg, {keys.PARTITION_ID: 0}, 3) == 0.2 * 3
    assert site_delay(cfg, {keys.PARTITION_ID: 2}, 3) == 0.2 * 3  # cycled
    assert site_delay(cfg, {keys.PARTITION_ID: 1}, 3) == 0.0
    assert site_delay(cfg, {keys.PARTITION_ID: 0, keys.GRID_DELAYS: True}, 3) == 0.0
    assert site_delay(cfg, {keys.DATA_PATH: "own.jsonl"}, 3) == 0.0


def test_a_deployed_site_slows_itself_with_its_own_setting() -> None:
    # Prepare: the server asks for no delay; the site's own `fedtune client --set simulation.site-delays=2`
    sets = site_settings(parse_assignments(["simulation.site-delays=2"]))
    node_config = {keys.DATA_PATH: "own.jsonl", **sets}
    cfg = RunConfig.from_flat({**RunConfig().to_flat(), **sets})  # the site's settings win (client/pipeline.py)

    # Execute
    delay = site_delay(cfg, node_config, 3)

    # Assert: a number is taken as the one-entry list; a site without a partition id takes the first entry
    assert cfg.simulation.site_delays == "2"  # the number becomes its text (config/fields.coerce)
    assert delay == 2 * 3
    assert site_delay(cfg, {**node_config, keys.PARTITION_ID: 4}, 3) == 2 * 3  # cycled, one entry
