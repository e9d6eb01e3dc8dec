"""GPU-site settings: each combination a site cannot run is refused with one line naming the key and the site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune.config import ModelConfig, RunConfig
from fedtune.core.errors import ConfigError
from fedtune.deploy.client import build_node_config
from fedtune.model import hardware
from fedtune.privacy import compat


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        (
            {"model.quantization": "4bit"},
            "`model.quantization` = 4bit at site 3 needs a CUDA GPU (bitsandbytes), but `train.device` is cpu.",
        ),
        (
            {"model.quantization": "8bit"},
            "`model.quantization` = 8bit at site 3 needs a CUDA GPU (bitsandbytes), but `train.device` is cpu.",
        ),
        ({"model.device-map": "auto"}, "`model.device-map` = auto at site 3 spreads the model over GPUs, but"),
        ({"train.precision": "fp16"}, "`train.precision` = fp16 at site 3 is for CUDA GPUs (fp16 with a gradient"),
    ],
)
def test_a_cpu_site_refuses_gpu_only_settings(flat: dict[str, Any], message: str) -> None:
    # Prepare
    cfg = RunConfig.from_flat({"train.device": "cpu", **flat})

    # Execute / Assert
    with pytest.raises(ConfigError, match=f"^{message.replace('(', '.').replace(')', '.')}"):
        hardware.check_site(cfg, "site 3")


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"^`train.device` = cuda at site 2, but no CUDA device is available\.$"):
        hardware.check_site(RunConfig.from_flat({"train.device": "cuda"}), "site 2")


def test_bf16_on_cpu_is_allowed() -> None:
    cpu = torch.device("cpu")
    hardware.check_site(RunConfig.from_flat({"train.device": "cpu", "train.precision": "bf16"}), "site 3")
    assert hardware.autocast_dtype("bf16", cpu) is torch.bfloat16 and hardware.autocast_dtype("fp32", cpu) is None


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_bf16_instructions() -> None:
    # Prepare: the kernel's own list of this CPU's instruction sets, the reference outside torch
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})

    # Execute
    chosen = hardware.resolve_precision("auto", torch.device("cpu"))

    # Assert: auto follows the hardware; explicit settings are never changed
    assert chosen == ("bf16" if native else "fp32")
    assert hardware.autocast_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native else None)
    assert [hardware.resolve_precision(p, torch.device("cpu")) for p in ("fp32", "bf16")] == ["fp32", "bf16"]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_never_picks_fp16_and_falls_back_to_fp32(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(hardware, "native_bf16", lambda device: native)
    assert hardware.resolve_precision("auto", torch.device("cuda")) == ("bf16" if native else "fp32")


def test_quantization_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a CUDA site on which bitsandbytes is not installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "_has", lambda module: module != "bitsandbytes")
    cfg = RunConfig.from_flat({"train.device": "cuda", "model.quantization": "4bit"})

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"`model.quantization` = 4bit at site 1 needs bitsandbytes: pip install"):
        hardware.check_site(cfg, "site 1")


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = RunConfig.from_flat({"train.device": "cuda", "train.num-processes": 2})

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"^`train.num-processes` = 2 at site 1 needs one GPU per process"):
        hardware.check_site(cfg, "site 1")


def test_dp_sgd_accepts_auto_precision() -> None:
    flat = {"privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0, "train.precision": "auto"}
    compat.check_round(RunConfig.from_flat(flat))  # no ConfigError: DP-SGD trains in fp32 (test_dp_trainer)


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"train.num-processes": 2}, "`train.num-processes` is not supported with `privacy.mechanism` = dp-sgd"),
        ({"train.gradient-checkpointing": True}, "`train.gradient-checkpointing` is not supported with"),
        ({"train.precision": "bf16"}, "`train.precision` is not supported with `privacy.mechanism` = dp-sgd"),
    ],
)
def test_dp_sgd_refuses_what_opacus_cannot_account(flat: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        compat.check_round(
            RunConfig.from_flat({"privacy.mechanism": "dp-sgd", "privacy.noise-multiplier": 1.0, **flat})
        )


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"train.num-processes": 5, "train.batch-size": 4}, r"`train.num-processes` \(5\) must be <= `train.batch"),
        ({"train.num-processes": 2, "model.device-map": "auto"}, r"`train.num-processes` must be 1 with `model.dev"),
        ({"train.grad-accum-steps": 0}, r"`train.grad-accum-steps` must be >= 1, got 0"),
        ({"model.quantization": "3bit"}, r"`model.quantization` must be one of none, 4bit, 8bit; got '3bit'"),
        ({"train.precision": "fp8"}, r"`train.precision` must be one of fp32, bf16, fp16, auto; got 'fp8'"),
    ],
)
def test_bad_gpu_settings_are_refused_by_the_config(flat: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        compat.check_round(RunConfig.from_flat(flat))  # a section's own rule raises already in from_flat


def test_fedtune_client_refuses_a_gpu_setting_this_machine_cannot_run(tmp_path: Path) -> None:
    # Prepare: a site's data file and auth key, the CPU chosen with --device
    data = tmp_path / "notes.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')

    # Execute / Assert: refused before anything starts, naming the key
    with pytest.raises(ConfigError, match=r"^`model.quantization` = 4bit at this site needs a CUDA GPU"):
        build_node_config(
            data=data,
            preset=None,
            auth_key=tmp_path / "node-1.key",
            share=None,
            device="cpu",
            sets={"model.quantization": "4bit", "train.precision": "bf16"},
        )


def test_a_cpu_server_evaluates_on_the_unquantized_base(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = ModelConfig(name="m", quantization="4bit", device_map="auto")

    # Execute
    plain = hardware.server_model(cfg)

    # Assert
    assert (plain.quantization, plain.device_map, plain.name) == ("none", "", "m")
    assert hardware.server_model(ModelConfig(name="m")) == ModelConfig(name="m")
