"""Task metrics and data checks end to end: real server loop, real ClientApp, shared backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.client.app import app as client_app
from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.config.presets import preset
from fedtune.data.loaders import DEMO_TEST
from fedtune.data.prompts import render_prompt
from fedtune.model.task_metrics import rouge_l, token_f1
from fedtune.server.app import run_server
from fedtune.simulations.local import LocalGrid

METRICS = {
    "eval.metrics": "loss,f1,rouge-l",
    "eval.max-generate": 2,
    "eval.max-new-tokens": 6,
    "eval.batch-size": 1,  # no padding: vanilla PEFT's one-prompt generate below gives the same tokens
    "num-server-rounds": 1,
}


def run(tiny_model: Path, out: Path, flat: dict[str, Any]) -> list[dict[str, Any]]:
    plan = Plan.from_flat(
        {
            **preset("tiny"),
            "model.name": str(tiny_model),
            "output.dir": str(out),
            "simulation.backend": "shared",
            **flat,
        }
    )
    run_server(plan, LocalGrid(client_app, 2))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_and_sites_json_carry_the_task_metrics(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "run"

    # Execute
    rows = run(tiny_model, out, METRICS)

    # Assert: every round has each metric, centrally and federated
    for row in rows:
        assert all(isinstance(row[f"{m}_{w}"], float) for m in ("f1", "rouge_l") for w in ("central", "federated"))
    # sites.json: each site's latest scores; the federated value is their generated-weighted mean
    sites = json.loads((out / "sites.json").read_text())
    last = rows[-1]
    assert set(sites["sites"]) == set(last["sites_eval"]) == {"1", "2"}
    evals = [s["eval"] for s in sites["sites"].values()]
    for name in ("rouge_l", "f1", "eval_loss"):
        values = [e[name] for e in evals]
        weights = [e["num_generated" if name != "eval_loss" else "num_examples"] for e in evals]
        assert last[f"{name}_federated"] == pytest.approx(
            sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
        )
        assert sites["spread"][name] == pytest.approx(
            {"min": min(values), "max": max(values), "mean": sum(values) / 2, "sites": 2}
        )
    assert all(s["data_checks"]["malformed"] == 0 for s in sites["sites"].values()) and "privacy" not in sites
    assert set(last["data_checks"]["1"]) == {
        *("malformed", "empty", "duplicates", "too_long", "prompts_cut", "responses_too_long")
    }
    summary = json.loads((out / "summary.json").read_text())["task_metrics"]
    assert summary["base"]["rouge_l"] == rows[0]["rouge_l"] and summary["final"]["rouge_l"] == last["rouge_l"]

    # Assert: the server's final ROUGE-L and F1, recomputed with vanilla PEFT generation and the scorers
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), str(out / "adapter")
    ).eval()
    records = [json.loads(line) for line in DEMO_TEST.read_text().splitlines()[:2]]
    cfg = RunConfig.from_flat(json.loads((out / "summary.json").read_text())["config"])
    answers = []
    for record in records:
        ids = tok(render_prompt(record, cfg.data, tok), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    assert last["rouge_l_central"] == pytest.approx(
        sum(rouge_l(a, r["output"]) for a, r in zip(answers, records, strict=True)) / 2
    )
    assert last["f1_central"] == pytest.approx(
        sum(token_f1(a, r["output"]) for a, r in zip(answers, records, strict=True)) / 2
    )


def test_under_dp_sites_send_no_data_checks_and_sites_json_says_scores_are_not_covered(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Prepare
    out = tmp_path / "run"
    flat = {**METRICS, "privacy.mechanism": "local", "privacy.noise-multiplier": 1.0, "eval.metrics": "loss,f1"}
    flat.update({"eval.centralized": False, "eval.max-generate": 1, "eval.federated": True})  # off by default

    # Execute
    rows = run(tiny_model, out, flat)

    # Assert
    assert all("data_checks" not in row for row in rows) and rows[-1]["replied"] == 2
    sites = json.loads((out / "sites.json").read_text())
    assert set(sites["sites"]) == {"1", "2"}
    assert all("data_checks" not in s for s in sites["sites"].values())
    assert "not covered" in sites["privacy"].lower() and "task metrics" in sites["privacy"]
