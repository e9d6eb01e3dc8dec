"""`OUT/adapter` names its base by hub id when the base came from fedtune's cached copy of one, and
the README's loading snippet (the exact local source from summary.json) works on this machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fedtune.config import ModelConfig
from fedtune.model.sources import cached_model_dir, hub_id
from fedtune.model.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "example-org/tiny-demo"


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- loading-snippet -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md has no loading snippet"
    return found.group(1)


def test_a_cached_copy_of_a_hub_id_gives_a_portable_adapter(tmp_path: Path) -> None:
    # Prepare: fedtune's cached copy of a hub id (as `fedtune fetch-model` writes for the demo)
    home = tmp_path / "home"
    env = {**os.environ, "FEDTUNE_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    os.environ["FEDTUNE_HOME"] = str(home)
    try:
        mirror = build_tiny_model(cached_model_dir(HUB_ID))
    finally:
        del os.environ["FEDTUNE_HOME"]
    out = tmp_path / "run"

    # Execute: a run whose model.name is the hub id, served from the cached copy
    args = ["simulate", "--preset", "tiny", "--out", str(out), "--rounds", "1", "--clients", "2"]
    sets = ["--set", "simulation.backend=shared", "--set", f"model.name={HUB_ID}"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args, *sets],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )

    # Assert: the adapter names the hub id; summary.json the exact local source
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == HUB_ID
    source = json.loads((out / "summary.json").read_text())["base_model_source"]
    assert source == {
        "name": HUB_ID,
        "local_path": str(mirror),
        "model.name": HUB_ID,
        "gguf_file": "",
        "quantization": "none",
    }

    # Execute: the README's loading snippet, on this machine
    scope: dict[str, object] = {}
    exec(readme_snippet().replace('out = "OUT"', f"out = {str(out)!r}"), scope)

    # Assert: it loaded the run's adapter weights onto the base
    model = scope["model"]
    state = dict(model.named_parameters())  # type: ignore[attr-defined]
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    key = next(k for k in saved if "lora_B" in k)
    loaded = next(v for k, v in state.items() if k.endswith(key.removesuffix(".weight") + ".default.weight"))
    assert abs(loaded.detach().numpy() - saved[key]).max() == 0
    assert abs(saved[key]).max() > 0


@pytest.mark.parametrize(
    ("name", "gguf", "expected"),
    [
        (HUB_ID, "", HUB_ID),  # a hub id with no cached copy: Hugging Face serves it
        ("mirror", "", HUB_ID),  # fedtune's cached copy, named by its path
        ("folder", "", None),  # any other local folder has no hub id
        ("mirror", "model.gguf", None),  # a GGUF file has none either
    ],
)
def test_hub_id_of_each_kind_of_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, gguf: str, expected: str | None
) -> None:
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path))
    paths = {"mirror": cached_model_dir(HUB_ID), "folder": tmp_path / "elsewhere" / "model"}
    for path in paths.values():
        path.mkdir(parents=True)
    assert hub_id(ModelConfig(name=str(paths.get(name, name)), gguf_file=gguf)) == expected
