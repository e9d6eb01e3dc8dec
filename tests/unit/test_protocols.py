"""Secure-aggregation protocols are registered parts: each name has its facts, its rules and a server runner."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.privacy.secagg.protocols import PROTOCOLS, secure
from fedtune.server.runners import RUNNERS


def test_every_protocol_has_a_server_runner_and_nothing_else_does() -> None:
    assert RUNNERS.names() == PROTOCOLS.names()


def test_only_a_protocol_that_hides_updates_makes_a_round_secure() -> None:
    # Prepare
    rounds = {name: RunConfig.from_flat({"secagg.protocol": name}) for name in PROTOCOLS.names()}

    # Execute / Assert: the fact each protocol declares, and an unknown name is never taken as secure
    assert {name: secure(cfg) for name, cfg in rounds.items()} == {"none": False, "secagg": True}
    assert not secure(RunConfig.from_flat({"secagg.protocol": "secagg+"}))
