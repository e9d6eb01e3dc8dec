"""Output a person can read (issue 15, section 3), checked from CLI runs with pipes, not a terminal."""

from __future__ import annotations

import json
import re
import tomllib
import unicodedata
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest

from fedtune.server.final_sample import DESC as FINAL_SAMPLE_DESC
from tests.conftest import CliRun
from tests.integration.test_simulation import fedtune

REPO = Path(__file__).resolve().parents[2]


def test_version() -> None:
    proc = fedtune("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fedtune {version('fedtune')}"


def test_simulate_help_shows_every_default() -> None:
    proc = fedtune("simulate", "--help")
    assert proc.returncode == 0, proc.stderr
    # argparse wraps the help text: one option's help runs until the next option
    helps = re.split(r"\n  (?=-)", proc.stdout.split("options:", 1)[1])
    described = {h.split()[0].rstrip(","): " ".join(h.split()) for h in helps if h.strip()}
    for flag in ("--preset", "--out", "--rounds", "--clients", "--seed", "--set", "--resume"):
        assert "(default:" in described[flag] or "default: " in described[flag], described[flag]
    assert "else 5)" in described["--clients"]  # the config's own default (RunConfig)


def test_readme_flwr_run_uses_flowers_current_keys() -> None:
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    text = (REPO / "README.md").read_text()
    section = text.split("### With `flwr run`", 1)[1].split("\n## ", 1)[0]
    toml_block = re.search(r"```toml\n(.*?)```", section, re.S)
    command = re.search(r"<!-- flwr-run -->\n```bash\n(.*?)```", section, re.S)
    assert toml_block and command, "README's flwr run section lost its config or command"

    # The connection: an address and no deprecated `options.` fields
    connection = tomllib.loads(toml_block.group(1))["superlink"]["local-sim"]
    assert connection == {"address": ":local:"}

    # The simulation's size: accepted by Flower's own --federation-config parser
    overrides = re.search(r'--federation-config "([^"]+)"', command.group(1))
    assert overrides
    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([overrides.group(1)]).items()}
    config = simulation_config_from_json(parsed)
    assert config.num_supernodes == 5 and config.client_resources_num_cpus == 1


@pytest.fixture(scope="module")
def shared_run(tiny_ray_run: Callable[[str], CliRun]) -> tuple[str, str, Path]:
    """A tiny Ray run (Flower's engine: its logs and its workers' too) whose held-out answers span
    two lines each (tests/conftest.py's run "b", which test_simulation also compares); stdout and
    stderr."""
    run = tiny_ray_run("b")
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, run.stderr, run.out


def test_progress_goes_to_stdout_and_only_warnings_to_stderr(shared_run: tuple[str, str, Path]) -> None:
    stdout, stderr, out = shared_run
    assert f"Outputs in {out}" in stdout and "Held-out prompt:" in stdout
    assert "torch thread(s)" in stdout  # a site's start-up line
    for line in stderr.splitlines():
        # a warning's own lines, or the indented continuation of a multi-line one
        # (a Ray worker's lines come with its "(ClientAppActor pid=N) " prefix)
        assert not line.strip() or re.match(r"(\(\w+ pid=\d+\) )?(WARNING|ERROR|CRITICAL)\b|\s", line), line


def test_no_colour_codes_debug_lines_or_raw_bytes_off_a_terminal(shared_run: tuple[str, str, Path]) -> None:
    stdout, stderr, _ = shared_run
    both = stdout + stderr
    assert "\x1b[" not in both
    assert not re.search(r"\bDEBUG\b", both)
    bad = {ch for ch in both if ch not in "\n\r\t" and (unicodedata.category(ch).startswith("C") or ch == "\ufffd")}
    assert not bad, sorted(bad)


def test_a_multi_line_answer_is_indented_as_one_block(shared_run: tuple[str, str, Path]) -> None:
    # Prepare: the sample as summary.json records it (its reference spans two lines)
    stdout, _, out = shared_run
    sample = json.loads((out / "summary.json").read_text())["sample"]
    first, second = sample["reference"].split("\n")

    # Assert: the reference's second line sits under its first, not at the left margin
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line == f"  reference : {first}")
    assert lines[at + 1] == " " * len("  reference : ") + second


def test_the_sample_answers_show_progress_and_start_before_the_last_round_is_reported(
    shared_run: tuple[str, str, Path],
) -> None:
    # Prepare: the run's lines (a bar redrawn in place is split at its carriage returns)
    stdout, _, out = shared_run
    lines = stdout.splitlines()
    most = 2 * json.loads((out / "summary.json").read_text())["config"]["eval.max-new-tokens"]

    # Assert: a bar over both answers' tokens, which reaches its end
    bars = [i for i, line in enumerate(lines) if line.startswith(f"{FINAL_SAMPLE_DESC}:")]
    assert bars, stdout[-2000:]
    assert f"| {most}/{most} [" in lines[bars[-1]], lines[bars[-1]]
    # Assert: generated while the sites evaluated the last round, so before its row; a run that
    # generated them after the round loop would print the bar after the row
    rounds = json.loads((out / "summary.json").read_text())["config"]["num-server-rounds"]
    last_row = next(i for i, line in enumerate(lines) if re.match(rf"\s+{rounds} \|", line))
    assert bars[-1] < last_row < next(i for i, line in enumerate(lines) if line.startswith("Held-out prompt:"))
