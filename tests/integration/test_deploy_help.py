"""Every deploy command's `--help` shows each default an operator would otherwise have to guess."""

from __future__ import annotations

import subprocess
import sys

import pytest


def help_text(command: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", command, "--help"], capture_output=True, text=True, check=True
    )
    return " ".join(proc.stdout.split())  # argparse wraps lines


@pytest.mark.parametrize(
    ("command", "needles"),
    [
        ("server", ["--address HOST:PORT", "(default: 127.0.0.1:8000; on --resume: the address the run used)"]),
        (
            "client",
            [
                "(default: retry forever, as flower-supernode)",
                "--register-wait SECONDS",
                "retry for this long (default: 60.0)",
                "(default: a free one)",
                "N the preset's site count: tiny 3, smollm2 5",
                "--poll-interval SECONDS",
                "(Flower's SuperNode: 3 s, which delays every message by up to that; default: 0.5)",
            ],
        ),
        ("keys", ["(default: localhost,127.0.0.1)"]),
    ],
)
def test_help_shows_defaults(command: str, needles: list[str]) -> None:
    text = help_text(command)
    for needle in needles:
        assert needle in text, (needle, text)
