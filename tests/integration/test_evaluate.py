"""``fedtune evaluate`` through the real lm-evaluation-harness, on a run directory built from its pieces
(the tiny base model, a vanilla PEFT adapter, a summary.json with the run's config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.cli import main
from fedtune.config import RunConfig
from fedtune.config.presets import preset
from fedtune.data.loaders import DEMO_TEST
from fedtune.model.lm_evaluate import INSTALL, SUITES, installed_tasks, suite_tasks
from fedtune.model.task_metrics import normalize_answer
from fedtune.model.tiny import build_tiny_model

MAX_NEW = 12


@torch.no_grad()
def greedy(model: Any, tok: Any, instruction: str) -> str:
    text = tok.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    return str(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT with a random (non-zero) LoRA adapter and a held-out set whose references are the greedy answers
    of the fine-tuned model (first two records) and of the base model (third), as transformers + PEFT give them."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    base_dir = build_tiny_model(out / "base-model")
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    instructions = [json.loads(line)["instruction"] for line in DEMO_TEST.read_text().splitlines()[:3]]
    base_answers = [greedy(base, tok, i) for i in instructions]
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(base, config).eval()
    tuned_answers = [greedy(tuned, tok, i) for i in instructions]
    tuned.save_pretrained(str(out / "adapter"))
    references = [tuned_answers[0], tuned_answers[1], base_answers[2]]
    heldout = out / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"instruction": i, "output": r}) + "\n" for i, r in zip(instructions, references, strict=True)
        )
    )
    flat = {**preset("tiny"), "model.name": str(base_dir), "data.eval-path": str(heldout)}
    flat |= {"eval.max-new-tokens": MAX_NEW, "eval.batch-size": 1, "lora.r": 4, "lora.target-modules": "q_proj,v_proj"}
    (out / "summary.json").write_text(json.dumps({"rounds": 1, "config": RunConfig.from_flat(flat).to_flat()}))
    # the test is only meaningful if the two models answer differently, and not with empty text
    assert all(normalize_answer(a) for a in references)
    assert [normalize_answer(a) for a in tuned_answers] != [normalize_answer(a) for a in base_answers]
    return out


def scores(path: Path) -> dict[str, float]:
    result = json.loads(path.read_text())["results"]["fedtune_heldout"]
    return {"exact_match": result["exact_match,none"], "f1": result["f1,none"]}


def test_heldout_task_scores_the_adapter_and_the_base_as_peft_does(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: no --tasks, so the run's own held-out set, offline
    tuned = main(["evaluate", str(run_dir), "--device", "cpu"])
    tuned_out = capsys.readouterr().out
    base = main(["evaluate", str(run_dir), "--base", "--device", "cpu"])

    # Assert: lm-eval generated exactly the greedy answers of base + adapter (2 of 3 references) and of
    # the base alone (1 of 3), and printed its table
    assert tuned == 0 and base == 0
    assert scores(run_dir / "eval" / "fedtune_heldout.json") == pytest.approx({"exact_match": 2 / 3, "f1": 2 / 3})
    assert scores(run_dir / "eval" / "fedtune_heldout-base.json") == pytest.approx({"exact_match": 1 / 3, "f1": 1 / 3})
    assert "|fedtune_heldout|" in tuned_out and "exact_match" in tuned_out
    assert "fedtune_heldout f1,none: base 0.3333 -> fine-tuned 0.6667" in capsys.readouterr().out
    assert (run_dir / "eval" / "tasks" / "fedtune_heldout" / "fedtune_heldout.yaml").is_file()


def test_the_model_card_carries_lm_evals_results(run_dir: Path, tmp_path: Path) -> None:
    # Prepare: both evaluations of the previous test are in OUT/eval
    assert main(["evaluate", str(run_dir), "--device", "cpu"]) == 0

    # Execute
    status = main(["export", str(run_dir), "--out", str(tmp_path / "export")])

    # Assert
    text = (tmp_path / "export" / "README.md").read_text()
    assert status == 0
    assert "lm-evaluation-harness, `eval/fedtune_heldout.json`" in text
    assert "| fedtune_heldout / exact_match,none | 0.6667 |" in text


def test_limit_caps_the_examples(run_dir: Path, tmp_path: Path) -> None:
    # Execute
    status = main(["evaluate", str(run_dir), "--limit", "2", "--tasks", "fedtune_heldout", "--device", "cpu"])

    # Assert: the first two references are the fine-tuned model's answers
    saved = json.loads((run_dir / "eval" / "fedtune_heldout.json").read_text())
    assert status == 0 and saved["n-samples"]["fedtune_heldout"] == {"original": 3, "effective": 2}
    assert scores(run_dir / "eval" / "fedtune_heldout.json") == pytest.approx({"exact_match": 1.0, "f1": 1.0})


def test_bad_input_gives_one_line(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute + Assert: an unknown task, then lm-eval missing
    assert main(["evaluate", str(run_dir), "--tasks", "fedtune_heldout,no_such_task_xyz"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no task 'no_such_task_xyz'" in err[0], err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without lm-eval imports
    assert main(["evaluate", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedtune: error: {INSTALL}"] and "pip install 'fedtune[eval]'" in INSTALL


def test_a_hub_task_without_the_network_gives_one_line(run_dir: Path, tmp_path: Path) -> None:
    # Prepare: empty hub and datasets caches, offline, so the medical suite's data cannot be found anywhere
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "ds")

    # Execute
    cmd = [sys.executable, "-m", "fedtune.cli", "evaluate", str(run_dir), "--suite", "medical", "--limit", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    # Assert
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedtune: error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and "medqa_4options" in errors[0] and "HF_HUB_OFFLINE=0" in errors[0], errors


def test_suites_keep_only_the_tasks_lm_eval_defines() -> None:
    # Prepare: lm-eval's own index of its tasks (fedtune builds it once per process; `--tasks` checks may have)
    known = set(installed_tasks().all_tasks)

    # Execute + Assert: each suite is non-empty and known to the installed lm-eval; unknown names drop out
    for name in SUITES:
        chosen = suite_tasks(name, known)
        assert chosen and set(chosen) <= known
    assert suite_tasks("medical", {"pubmedqa", "not_medical"}) == ["pubmedqa"]
    assert "medqa_4options" in suite_tasks("medical", known) and suite_tasks("general", known) == ["mmlu"]
