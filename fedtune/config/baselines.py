"""Config key ``baselines``: the models ``fedtune simulate`` trains after the federated run to compare with."""

from __future__ import annotations

from fedtune.config.evaluation import parse_names
from fedtune.config.fields import require

LOCAL = "local"
CENTRALIZED = "centralized"
KNOWN = (LOCAL, CENTRALIZED)
"""``local``: each site alone; ``centralized``: one model on the union of the sites' data (pooled)."""


def parse_baselines(text: str) -> list[str]:
    """``"local, centralized"`` -> ``["local", "centralized"]`` (order kept, duplicates dropped)."""
    return parse_names(text)


def check_baselines(text: str) -> None:
    """Refuse a name outside :data:`KNOWN`, naming the key."""
    unknown = [n for n in parse_baselines(text) if n not in KNOWN]
    require(
        not unknown,
        "baselines",
        f"has unknown baseline(s) {', '.join(map(repr, unknown))}; known: {', '.join(KNOWN)}.",
    )
