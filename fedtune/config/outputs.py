"""Config sections ``simulation.*`` and ``output.*``: how a local federation runs and where results go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedtune.config.fields import require


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """``simulation.*``: the local federation (Flower's simulation engine, Ray backend)."""

    backend: Literal["ray", "shared"] = "ray"
    """``ray``: Flower's simulation engine, one process per client; ``shared``: every site in this
    process, in turn, on one resident base model (many sites, little memory)."""
    num_supernodes: int = 5
    """Simulated data sites."""
    num_cpus: int = 1
    """CPUs per simulated client (Flower's default of 2 runs one client at a time on 2 cores)."""
    num_gpus: float = 0.0
    """GPUs per simulated client; fractions share a GPU."""
    site_ranks: str = ""
    """Comma-separated LoRA rank per simulated site (cycled), e.g. ``16,8,4``; empty: all ``lora.r``."""
    ray_address: str = ""
    """The Ray cluster the ``ray`` backend runs on. Empty: a new local Ray instance, always (never
    one that ``ray start`` left running, nor ``RAY_ADDRESS``); ``auto``: the running cluster Ray
    finds (``RAY_ADDRESS``, else the one ``ray start`` started on this machine); ``HOST:PORT``: the
    cluster whose head listens there. Each client asks the cluster for ``simulation.num-cpus`` CPUs
    and ``simulation.num-gpus`` GPUs."""

    site_delays: str = ""
    """Comma-separated extra seconds per local step for each simulated site (cycled like
    ``simulation.site-ranks``), e.g. ``0,0,0,2`` makes every fourth site slower; empty: none."""

    def __post_init__(self) -> None:
        host, _, port = self.ray_address.rpartition(":")
        require(
            self.ray_address in ("", "auto")
            or (bool(host) and "://" not in host and port.isdigit() and 0 < int(port) < 65536),
            "simulation.ray-address",
            f"must be empty (a new local Ray), `auto` or HOST:PORT of a Ray head, got {self.ray_address!r}.",
        )
        require(self.num_supernodes >= 1, "simulation.num-supernodes", "must be >= 1.")
        require(self.num_cpus >= 1, "simulation.num-cpus", "must be >= 1.")
        require(self.num_gpus >= 0, "simulation.num-gpus", "must be >= 0.")
        require(
            all(p.strip().isdigit() and int(p) >= 1 for p in self.site_ranks.split(",")) if self.site_ranks else True,
            "simulation.site-ranks",
            f"must be comma-separated ranks >= 1, got {self.site_ranks!r}.",
        )
        require(
            _seconds(self.site_delays) is not None,
            "simulation.site-delays",
            f"must be comma-separated seconds >= 0, got {self.site_delays!r}.",
        )

    def ranks(self) -> list[int]:
        """The per-site ranks, empty when every site uses ``lora.r``."""
        return [int(p) for p in self.site_ranks.split(",")] if self.site_ranks else []

    def delay(self, partition: int) -> float:
        """Extra seconds per local step of the site with partition id ``partition`` (0 when none is set)."""
        delays = _seconds(self.site_delays) or []
        return delays[partition % len(delays)] if delays else 0.0


def _seconds(text: str) -> list[float] | None:
    """``text``'s comma-separated non-negative finite numbers (empty text: none), or None if malformed."""
    if not text.strip():
        return []
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        return None
    return values if all(0 <= v < float("inf") for v in values) else None


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """``output.*``: where results go."""

    dir: str = ""
    """Run directory; empty means ``runs/<timestamp>``."""
    resume: bool = False
    """Continue the run in ``output.dir`` from its last complete checkpoint."""
    log_participants: bool = False
    """Write the sampled and replying node ids (and each node's failures, bytes and rank) to the
    outputs and the log when the accountant claims amplification by client sampling
    (``privacy.mechanism = central`` with ``server.sampling = poisson``). Off by default, because
    amplification assumes nobody outside the server knows who was sampled; when on, the guarantee
    then assumes these outputs stay secret from the adversary. Without such a claim ids are always
    written."""
