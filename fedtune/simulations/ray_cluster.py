"""Which Ray the simulation engine runs on: a new local instance, or a cluster the user already has.

Flower's Ray backend calls ``ray.init(**init_args)`` with the ``init_args`` of the backend config
(``flwr/server/superlink/fleet/vce/backend/raybackend.py``). Left without an address, ``ray.init``
joins whatever cluster it can find: ``RAY_ADDRESS``, or the one a ``ray start`` left running on
the machine, and a run then dies with that cluster. fedtune therefore always names the address:
``local`` (a new instance, whatever is running) unless ``simulation.ray-address`` asks to attach.
"""

from __future__ import annotations

from typing import Any

from fedtune.config import RunConfig

LOCAL = "local"  # ray.init's name for "start a new local instance", ignoring RAY_ADDRESS


def ray_address(cfg: RunConfig) -> str:
    """The ``address`` for ``ray.init``: ``local`` for an empty ``simulation.ray-address``."""
    return cfg.simulation.ray_address or LOCAL


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Flower's backend config: each client's resources, and how Ray is started or joined."""
    return {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": cfg.simulation.num_gpus},
        "init_args": {"address": ray_address(cfg), "logging_level": "error", "log_to_driver": True},
    }
