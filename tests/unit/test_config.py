"""Config: flat <-> typed round trip, unknown keys and bad types refused, pyproject in sync."""

from __future__ import annotations

import tomllib

import pytest

from fedtune.config import RunConfig, flat_defaults, parse_assignments, parse_value
from fedtune.core.errors import ConfigError
from fedtune.privacy import compat
from tests.conftest import REPO


def test_flat_round_trip() -> None:
    # Prepare
    cfg = RunConfig.from_flat({"lora.r": 4, "train.lr": 1, "data.format": "alpaca", "eval.federated": False})

    # Execute
    again = RunConfig.from_flat(cfg.to_flat())

    # Assert
    assert again == cfg
    assert cfg.lora.r == 4 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.format == "alpaca" and cfg.eval.federated is False


def test_pyproject_config_matches_code_defaults() -> None:
    # Prepare
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())

    # Execute
    table = pyproject["tool"]["flwr"]["app"]["config"]
    flat = {}

    def walk(prefix: str, node: dict[str, object]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", table)

    # Assert
    assert flat == flat_defaults()


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"no.such-key": 1}, r"Unknown config key `no\.such-key`"),
        ({"lora.rr": 1}, r"Did you mean `lora\.r`"),
        ({"lora.r": "abc"}, r"`lora\.r` must be an integer, got 'abc'"),
        ({"lora.r": 1.5}, r"`lora\.r` must be an integer"),
        ({"train.lr": "fast"}, r"`train\.lr` must be a number"),
        ({"eval.federated": 1}, r"`eval\.federated` must be true or false"),
        ({"eval.federated": "yes"}, r"`eval\.federated` must be true or false \(or \"auto\"\), got 'yes'"),
        ({"data.format": "xml"}, r"`data\.format` must be one of alpaca, chat"),
        ({"lora.r": 0}, r"`lora\.r` must be >= 1"),
    ],
)
def test_bad_values_name_their_key(flat: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat(flat)


def test_rules_across_sections_are_the_checkers() -> None:
    with pytest.raises(ConfigError, match=r"`server\.min-replies` \(5\) must be <= `server\.min-clients`"):
        compat.check_round(RunConfig.from_flat({"server.min-replies": 5}))


def test_set_values_parse_as_toml_scalars() -> None:
    assert parse_value("8") == 8
    assert parse_value("1e-3") == pytest.approx(1e-3)
    assert parse_value("true") is True
    assert parse_value('"x y"') == "x y"
    assert parse_value("q_proj,v_proj") == "q_proj,v_proj"
    assert parse_assignments(["lora.r=16", "model.name=/a/b"]) == {"lora.r": 16, "model.name": "/a/b"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["lora.r"])


def test_a_number_set_for_a_string_key_is_its_text_and_a_boolean_is_refused() -> None:
    # Prepare: what `--set simulation.site-delays=2` and `--set simulation.site-delays=0.5` parse to
    flat = parse_assignments(["simulation.site-delays=2", "model.name=0.5"])

    # Execute
    cfg = RunConfig().override(flat)

    # Assert: the text a user typed (TOML read it as a number); true is not a string
    assert (cfg.simulation.site_delays, cfg.model.name) == ("2", "0.5")
    assert cfg.simulation.delay(0) == 2.0
    with pytest.raises(ConfigError, match=r"`simulation\.site-delays` must be a string, got True"):
        RunConfig().override({"simulation.site-delays": True})


@pytest.mark.parametrize(
    ("value", "without_dp", "under_dp"),
    [(None, True, False), ("auto", True, False), (True, True, True), (False, False, False)],
)
def test_federated_eval_defaults_off_under_dp_and_keeps_an_explicit_choice(
    value: object, without_dp: bool, under_dp: bool
) -> None:
    # Prepare: the key unset, or set as a user would on the command line
    flat = {} if value is None else {"eval.federated": parse_value(str(value).lower())}

    # Execute
    cfg = RunConfig.from_flat(flat)

    # Assert
    assert (cfg.eval.federated_on(dp=False), cfg.eval.federated_on(dp=True)) == (without_dp, under_dp)
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_participants_are_not_logged_by_default() -> None:
    assert RunConfig().output.log_participants is False
    assert RunConfig.from_flat({"output.log-participants": True}).output.log_participants is True
