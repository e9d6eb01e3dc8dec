"""Bad input gives one clear line naming the key or file, exit status 1, and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_simulation import fedtune


def assert_clean_failure(proc_stderr: str, returncode: int, needle: str, out: Path) -> None:
    assert returncode == 1, proc_stderr[-2000:]
    assert "Traceback" not in proc_stderr
    errors = [line for line in proc_stderr.splitlines() if line.startswith("fedtune: error:")]
    assert len(errors) == 1 and needle in errors[0], proc_stderr[-2000:]
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not list(out.parent.rglob(".*tmp*"))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--set", "no.such-key=1"], "`no.such-key`"),
        (["--set", "lora.r=abc"], "`lora.r` must be an integer"),
        (
            ["--set", "data.path=/nonexistent/data.jsonl"],
            "`data.path`: no such data file: /nonexistent/data.jsonl",
        ),
        (
            ["--set", "model.name=/nonexistent/model"],
            "`model.name`: no such model directory: /nonexistent/model",
        ),
        (["--clients", "4"], "distinct `site` value"),
    ],
)
def test_bad_input(tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "run"
    proc = fedtune(
        "simulate",
        "--preset",
        "tiny",
        "--set",
        "data.partitioner=natural",
        "--out",
        str(out),
        *extra,
        timeout=120,
    )
    assert_clean_failure(proc.stderr, proc.returncode, needle, out)


def test_empty_partition(tmp_path: Path) -> None:
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(3)))
    out = tmp_path / "run"
    proc = fedtune(
        "simulate",
        "--preset",
        "tiny",
        "--clients",
        "3",
        "--set",
        f"data.path={data}",
        "--set",
        "data.partitioner=iid",
        "--set",
        f"data.eval-path={data}",
        "--out",
        str(out),
    )
    assert_clean_failure(proc.stderr, proc.returncode, "partition holds 1 record", out)


def test_chat_format_without_template(tiny_model_no_template: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = fedtune(
        "simulate",
        "--preset",
        "tiny",
        "--set",
        f"model.name={tiny_model_no_template}",
        "--set",
        "data.format=chat",
        "--out",
        str(out),
    )
    assert_clean_failure(
        proc.stderr, proc.returncode, '`data.format` = "chat" needs a tokenizer with a chat template', out
    )


def test_server_with_missing_keys_names_the_file(tmp_path: Path) -> None:
    proc = fedtune("server", "--keys", str(tmp_path / "nokeys"), "--preset", "tiny", "--out", str(tmp_path / "run"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"`--keys`: cannot read {tmp_path / 'nokeys' / 'ca.pem'}" in proc.stderr


def test_server_port_already_in_use(tmp_path: Path) -> None:
    import socket

    assert fedtune("keys", "--out", str(tmp_path / "keys"), "--nodes", "1").returncode == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = fedtune(
            "server",
            "--keys",
            str(tmp_path / "keys"),
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "run"),
            "--address",
            f"127.0.0.1:{port}",
        )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"`--address`: 127.0.0.1:{port} is already in use." in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "/nonexistent/site.jsonl"], "`--data`: no such file or directory: /nonexistent/site.jsonl"),
        (
            ["--data", "/etc/hostname", "--root-cert", "/nonexistent/ca.pem"],
            "`--root-cert`: no such file: /nonexistent/ca.pem",
        ),
        (["--preset", "tiny", "--set", "strategy.name=krum"], "`--set strategy.name`: a site may set only"),
        (["--preset", "tiny", "--poll-interval", "0"], "`--poll-interval` must be a number of seconds > 0, got '0'."),
    ],
)
def test_client_bad_input(tmp_path: Path, args: list[str], needle: str) -> None:
    assert fedtune("keys", "--out", str(tmp_path / "keys"), "--nodes", "1").returncode == 0
    base = ["client", "--superlink", "127.0.0.1:1", "--root-cert", str(tmp_path / "keys" / "ca.pem")]
    proc = fedtune(*base, "--auth-key", str(tmp_path / "keys" / "nodes" / "node-1.key"), *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr, proc.stderr
