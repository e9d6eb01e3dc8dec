"""`simulation.ray-address`: what fedtune hands to ``ray.init`` through Flower's backend config, read
back through Ray's own address resolution (no Ray is started here)."""

from __future__ import annotations

import pytest
from ray._private.services import canonicalize_bootstrap_address

from fedtune.config import RunConfig
from fedtune.core.errors import ConfigError
from fedtune.simulations.ray_cluster import backend_config


def init_args(**flat: str | int | float) -> dict[str, object]:
    return dict(backend_config(RunConfig.from_flat(dict(flat)))["init_args"])


def test_the_default_makes_ray_start_a_new_instance_even_when_ray_address_names_a_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the variable `ray start` tells users to export
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")

    # Execute
    address = init_args()["address"]

    # Assert: Ray resolves it to "no cluster, start one"; left out (None), Ray would take RAY_ADDRESS
    assert canonicalize_bootstrap_address(address) is None  # type: ignore[arg-type]
    assert canonicalize_bootstrap_address(None) == "10.0.0.5:6379"  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["auto", "10.0.0.5:6379", "head.cluster:6380"])
def test_an_address_is_passed_to_ray_as_given(value: str) -> None:
    assert init_args(**{"simulation.ray-address": value})["address"] == value


def test_client_resources_are_what_each_client_asks_the_cluster_for() -> None:
    cfg = RunConfig.from_flat({"simulation.num-cpus": 4, "simulation.num-gpus": 0.5})
    assert backend_config(cfg)["client_resources"] == {"num_cpus": 4, "num_gpus": 0.5}


@pytest.mark.parametrize("value", ["local", "6379", "host:", "host:port", "ray://host:10001", "host:70000"])
def test_a_bad_address_is_one_line_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^`simulation.ray-address` must be empty .* got"):
        RunConfig.from_flat({"simulation.ray-address": value})
