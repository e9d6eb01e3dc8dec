"""``fedtune export`` and ``fedtune chat`` on a real tiny federated run, checked against vanilla
transformers + PEFT loading the run's own output folder (``OUT/base-model`` + ``OUT/adapter``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.cli import main
from fedtune.model.chat import answer
from fedtune.model.finished import open_run

DESCRIPTION = "Synthetic dosage-arithmetic notes from five simulated hospitals (test run)."
PROMPTS = ["A patient weighing 80 kg is prescribed Velquodex at 1 mg/kg. What dose?", "What is 2 mg/kg x 5 kg?"]
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])  # (1, T) token ids inside the tiny vocabulary


def fedtune(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI the way a user does, with ``stdin`` as its standard input."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedtune.cli", *args]
    # bytes, decoded by hand: text mode would turn a generated "\r" into "\n"
    proc = subprocess.run(cmd, input=(stdin or "").encode(), capture_output=True, timeout=300, env=env)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One round of a 2-site tiny federation under central DP (so the card has a privacy statement)."""
    out = tmp_path_factory.mktemp("export") / "run"
    proc = fedtune(
        *("simulate", "--preset", "tiny", "--rounds", "1", "--clients", "2", "--out", str(out)),
        *("--set", "simulation.backend=shared", "--set", f"data.description={json.dumps(DESCRIPTION)}"),
        *("--set", "privacy.mechanism=central", "--set", "strategy.weighting=uniform"),
        *("--set", "privacy.noise-multiplier=0.3", "--set", "privacy.clip-norm=5.0"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def reference(run_dir: Path, base: bool = False) -> tuple[Any, Any]:
    """The run's model as a user loads it with transformers and PEFT alone, in fp32."""
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "base-model"), dtype=torch.float32)
    if not base:
        model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    return model.eval(), AutoTokenizer.from_pretrained(str(run_dir / "base-model"))


@torch.no_grad()
def logits(model: Any) -> torch.Tensor:
    return model(input_ids=IDS).logits  # (1, T, V)


@torch.no_grad()
def greedy(model: Any, tok: Any, prompt: str, max_new_tokens: int) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return str(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def test_merged_export_gives_the_logits_of_base_plus_adapter(run_dir: Path, tmp_path: Path) -> None:
    # Prepare
    ref, _ = reference(run_dir)
    base, _ = reference(run_dir, base=True)
    dest = tmp_path / "merged"

    # Execute
    proc = fedtune("export", str(run_dir), "--out", str(dest), "--merge", "--dtype", "fp32")

    # Assert: a plain transformers folder with no LoRA weights, the logits of base + adapter
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(str(dest)).eval()
    assert merged.dtype == torch.float32
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), logits(ref), rtol=0, atol=1e-4)
    assert (logits(ref) - logits(base)).abs().max() > 1e-3  # the adapter changes the model
    assert (
        AutoTokenizer.from_pretrained(str(dest)).chat_template
        == AutoTokenizer.from_pretrained(str(run_dir / "base-model")).chat_template
    )


def test_merged_export_in_bf16_is_the_fp32_merge_cast(run_dir: Path, tmp_path: Path) -> None:
    # Prepare: PEFT's own merge of the run's adapter, cast to bf16
    ref, _ = reference(run_dir)
    expected = {k: v.to(torch.bfloat16) for k, v in ref.merge_and_unload().state_dict().items()}
    dest = tmp_path / "bf16"

    # Execute
    proc = fedtune("export", str(run_dir), "--out", str(dest), "--merge", "--dtype", "bf16")

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(str(dest / "model.safetensors"))
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    for key, value in saved.items():
        assert value.dtype == torch.bfloat16, key
        assert torch.equal(value, expected[key]), key


def test_adapter_export_loads_with_vanilla_peft_and_carries_a_model_card(run_dir: Path, tmp_path: Path) -> None:
    # Prepare: lm-eval-style results and a baselines file beside the run's own outputs
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "eval").mkdir()
    (out / "eval" / "heldout.json").write_text(json.dumps({"results": {"heldout": {"exact_match,none": 0.25}}}))
    (out / "baselines.json").write_text(json.dumps({"eval_loss": {"federated": 5.1, "centralized": 4.9}}))
    summary = json.loads((run_dir / "summary.json").read_text())
    dest = tmp_path / "adapter"

    # Execute
    proc = fedtune("export", str(out), "--out", str(dest))

    # Assert: PEFT loads the folder on the base its config names, with the run's logits
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((dest / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(dest)).eval()
    ref, _ = reference(run_dir)
    torch.testing.assert_close(logits(loaded), logits(ref), rtol=0, atol=1e-6)
    # the card: Hub metadata as huggingface_hub parses it, and the run's facts in the text
    card = ModelCard.load(dest / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"fedtune", "federated-learning", "lora", "differential-privacy"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local path is not a hub id
    privacy = summary["privacy"]
    for fact in (
        DESCRIPTION,
        "sites that sent updates: 2",
        "rounds completed: 1",
        f"epsilon: {privacy['epsilon']:.4g}",
        f"delta: {privacy['delta']:.4g}",
        f"unit protected: {privacy['unit']}",
        f"trust assumption: {privacy['trust']}",
        "| heldout / exact_match,none | 0.25 |",
        "| eval_loss / centralized | 4.9 |",
    ):
        assert fact in card.text, fact


def test_bad_run_directories_give_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a run without its adapter, one without summary.json, a prompt-tuning run to merge
    no_adapter, no_summary, prompt = tmp_path / "a", tmp_path / "s", tmp_path / "p"
    for copy in (no_adapter, no_summary, prompt):
        shutil.copytree(run_dir, copy)
    shutil.rmtree(no_adapter / "adapter")
    (no_summary / "summary.json").unlink()
    summary = json.loads((prompt / "summary.json").read_text())
    summary["config"]["peft.method"] = "prompt-tuning"
    (prompt / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        (["export", str(no_adapter), "--out", str(tmp_path / "o1")], f"{no_adapter / 'adapter'}: missing"),
        (["export", str(no_summary), "--out", str(tmp_path / "o2")], f"{no_summary / 'summary.json'}: missing"),
        (["chat", str(no_summary), "--prompt", "hi"], f"{no_summary / 'summary.json'}: missing"),
        (["export", str(prompt), "--out", str(tmp_path / "o3"), "--merge"], "`--merge`: `peft.method` = prompt-tuning"),
        (["export", str(run_dir), "--out", str(tmp_path / "full")], "exists and is not an empty directory"),
    ]
    for argv, needle in cases:
        # Execute
        status = main(argv)

        # Assert
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 1 and len(err) == 1 and err[0].startswith("fedtune: error:") and needle in err[0], err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_chat_one_shot_answers_as_the_run_model_greedily(run_dir: Path) -> None:
    # Prepare
    ref, tok = reference(run_dir)
    base, _ = reference(run_dir, base=True)

    # Execute
    tuned = fedtune("chat", str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--device", "cpu")
    plain = fedtune("chat", str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--base", "--device", "cpu")

    # Assert
    assert tuned.returncode == 0 and plain.returncode == 0, tuned.stderr[-2000:] + plain.stderr[-2000:]
    assert tuned.stdout == greedy(ref, tok, PROMPTS[0], 12) + "\n"
    assert plain.stdout == greedy(base, tok, PROMPTS[0], 12) + "\n"
    assert tuned.stdout != plain.stdout


def test_chat_reads_one_message_per_stdin_line_until_eof(run_dir: Path) -> None:
    # Prepare
    ref, tok = reference(run_dir)
    stdin = f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n"

    # Execute
    proc = fedtune("chat", str(run_dir), "--max-new-tokens", "10", "--device", "cpu", stdin=stdin)

    # Assert: the blank line is skipped, each message answered on its own line
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "".join(greedy(ref, tok, p, 10) + "\n" for p in PROMPTS)


def test_answers_stream_piece_by_piece(run_dir: Path) -> None:
    # Prepare: the run's base model (deterministic: the adapter's central-DP noise is not seeded, so
    # what the tuned model says, and where its word boundaries fall, changes from run to run)
    run = open_run(run_dir)
    model, tok = reference(run_dir, base=True)
    pieces: list[str] = []

    # Execute
    text = answer(model, tok, PROMPTS[1], run.cfg.data, max_new_tokens=24, on_text=pieces.append)

    # Assert: the text arrived in several pieces during generation, and adds up to the whole answer
    assert len(pieces) > 1, pieces
    assert "".join(pieces) == text == greedy(model, tok, PROMPTS[1], 24)
