"""Secure-aggregation protocols, registered by the name ``secagg.protocol`` selects.

A protocol is one object with its facts and its rules: whether the server sees only the sum
(:attr:`SecaggProtocol.hides_updates`) and why its settings cannot run with a given number of sampled
clients (:meth:`SecaggProtocol.problems`). The server runs a round through the runner registered under
the same name (``fedtune.server.runners``); a site answers the protocol's stages through the handlers
its ClientApp registers. Adding a protocol means one module here, its registration, and its runner.
"""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.core.registry import Registry
from fedtune.privacy.secagg import settings


class SecaggProtocol:
    """The defaults: updates travel in the clear and there is nothing to set."""

    name = ""
    hides_updates = False
    """Whether the server learns only the sum of the round's updates, never one update."""

    def problems(self, cfg: RunConfig, n_clients: int) -> list[str]:
        """Why ``cfg``'s ``secagg.*`` settings cannot run with ``n_clients`` sampled clients."""
        return []


class Clear(SecaggProtocol):
    """``none``: each update reaches the server as the site sent it."""

    name = "none"


class SecAggPlus(SecaggProtocol):
    """``secagg``: SecAgg+ (Bell et al. 2020): pairwise masks over a k-regular graph, Shamir-shared secrets."""

    name = "secagg"
    hides_updates = True

    def problems(self, cfg: RunConfig, n_clients: int) -> list[str]:
        return settings.problems(cfg, n_clients)


PROTOCOLS: Registry[SecaggProtocol] = Registry("secagg.protocol")
for _protocol in (Clear(), SecAggPlus()):
    PROTOCOLS.register(_protocol.name)(_protocol)


def secure(cfg: RunConfig) -> bool:
    """Whether round config ``cfg`` hides each update from the server (an unknown name: False; the
    checker reports it)."""
    name = cfg.secagg.protocol
    return name in PROTOCOLS and PROTOCOLS.get(name).hides_updates
