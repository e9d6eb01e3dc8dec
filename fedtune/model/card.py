"""The model card (``README.md`` with Hub metadata) that ``fedtune export`` writes beside the model.

It states only what the run's own outputs record: the base model, the method, the sites and
rounds, the operator's ``data.description``, the evaluation results (``summary.json``'s held-out
loss and task metrics, ``OUT/baselines.json``, ``OUT/eval/*.json``) and ``summary.json``'s privacy
statement. The YAML front matter is written by ``huggingface_hub``'s ``ModelCardData``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedtune.model.finished import FinishedRun, metrics_rows, read_json

BASELINES_FILE = "baselines.json"
EVAL_DIR = "eval"
PRIVACY_FIELDS = (
    ("mechanism", "mechanism"),
    ("unit", "unit protected"),
    ("epsilon", "epsilon"),
    ("delta", "delta"),
    ("accountant", "accountant"),
    ("guarantee_holds", "guarantee holds"),
    ("why_not", "why not"),
    ("guarantee", "guarantee"),
    ("trust", "trust assumption"),
    ("covers", "covers"),
    ("epsilon_under_collusion", "epsilon under collusion"),
)


def is_hub_id(name: str) -> bool:
    """True for ``owner/name`` (what the Hub's ``base_model`` metadata accepts), not a local path."""
    return name.count("/") == 1 and not name.startswith(("/", ".", "~")) and not Path(name).exists()


def sites_and_rounds(run: FinishedRun) -> tuple[int | None, int]:
    """The sites that sent an update in some round (None when the run withheld node ids) and the
    rounds the run completed."""
    rows = metrics_rows(run)
    nodes = {n for row in rows for n in row.get("replied_nodes") or []}
    final = run.summary.get("final") or {}
    rounds = int(final.get("round", run.summary.get("rounds", 0)))
    return (len(nodes) if nodes else None), rounds


def card_metadata(run: FinishedRun, *, merged: bool) -> dict[str, Any]:
    """The front matter: base_model (a hub id only), library_name, pipeline_tag, tags."""
    cfg = run.cfg
    tags = ["fedtune", "federated-learning", cfg.peft.method, cfg.strategy.name]
    private = run.summary.get("privacy") or {}
    if "unit" in private:  # summary.json states a DP unit only for a run with a DP mechanism
        tags += ["differential-privacy", f"dp-{private['mechanism']}"]
    if run.summary.get("secure_aggregation"):  # written when some round ran secure aggregation
        tags.append("secure-aggregation")
    meta: dict[str, Any] = {
        "library_name": "peft" if run.peft and not merged else "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    if is_hub_id(cfg.model.name):
        meta["base_model"] = cfg.model.name
    return meta


def model_card(run: FinishedRun, *, merged: bool, dtype: str) -> str:
    """The whole ``README.md``: front matter, then the card's sections."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**card_metadata(run, merged=merged))
    body = "\n".join(_body(run, merged=merged, dtype=dtype))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n"))


def _body(run: FinishedRun, *, merged: bool, dtype: str) -> Iterator[str]:
    cfg = run.cfg
    sites, rounds = sites_and_rounds(run)
    kind = "the merged full model" if merged else ("a PEFT adapter" if run.peft else "the full fine-tuned model")
    yield f"# Federated fine-tune of {cfg.model.name}"
    yield ""
    yield f"This folder holds {kind} ({dtype}), fine-tuned with fedtune (federated LoRA fine-tuning on"
    yield "Flower): each site trained on its own data and sent only its update; the server aggregated them."
    yield ""
    yield "## Training"
    yield ""
    yield f"- base model: `{cfg.model.name}`" + (f" (GGUF file `{cfg.model.gguf_file}`)" if cfg.model.gguf_file else "")
    if run.summary.get("base_model") and run.summary["base_model"] != cfg.model.name:
        yield f"  (loaded from `{run.summary['base_model']}`)"
    yield f"- method: `{cfg.peft.method}`" + _method_detail(run)
    yield f"- aggregation: `{cfg.strategy.name}` (weighting: {cfg.strategy.weighting})"
    yield f"- sites that sent updates: {sites if sites is not None else 'not recorded (no node ids in metrics.jsonl)'}"
    yield f"- rounds completed: {rounds} (planned: {cfg.num_server_rounds})"
    yield f"- prompt format: `{cfg.data.format}`" + (
        " (the tokenizer's chat template)" if cfg.data.format == "chat" else " (Alpaca template)"
    )
    yield f"- run id: `{run.summary.get('run_id', '-')}`"
    yield ""
    yield "## Data"
    yield ""
    yield cfg.data.description.strip() or "The operator gave no description (`data.description`)."
    yield ""
    yield from _evaluation(run)
    yield from _privacy(run.summary)


def _method_detail(run: FinishedRun) -> str:
    lora = run.cfg.lora
    if run.cfg.peft.method not in ("lora", "lora-sb"):
        return ""
    return (
        f" (r = {lora.r}, alpha = {lora.alpha}, target modules: {lora.target_modules})"
        + (", FFA-LoRA (A frozen)" if lora.freeze_a else "")
        + (
            f", A and B fixed by the server ({run.cfg.peft.sb_init}), r x r cores trained and folded into B"
            if run.cfg.peft.method == "lora-sb"
            else ""
        )
    )


def _evaluation(run: FinishedRun) -> Iterator[str]:
    summary = run.summary
    yield "## Evaluation"
    yield ""
    first, last = summary.get("eval_loss_first"), summary.get("eval_loss_last")
    if first is not None and last is not None:
        yield f"Held-out loss per response token: base model {_num(first)}, fine-tuned {_num(last)}."
        yield ""
    task = summary.get("task_metrics")
    if task:
        yield f"Task metrics on held-out prompts (base model -> final model, round {task.get('final_round')}):"
        yield ""
        yield "| metric | base | fine-tuned |"
        yield "|---|---|---|"
        for name, base in task.get("base", {}).items():
            yield f"| {name} | {_num(base)} | {_num(task.get('final', {}).get(name))} |"
        yield ""
    baselines = read_json(run.out / BASELINES_FILE)
    if isinstance(baselines, Mapping):
        yield f"Against training without federation (`{BASELINES_FILE}`; the baselines are not private):"
        yield ""
        yield from _value_table(baselines)
    for path in sorted((run.out / EVAL_DIR).glob("*.json")):
        results = read_json(path)
        if isinstance(results, Mapping):
            yield f"lm-evaluation-harness, `{EVAL_DIR}/{path.name}`:"
            yield ""
            yield from _value_table(results.get("results", results))


def _value_table(tree: Mapping[str, Any]) -> Iterator[str]:
    """Every number in a nested JSON object, one row per path (the files' own keys, as written)."""
    rows = list(_leaves(tree, ()))
    if not rows:
        yield "(no numeric results)"
        yield ""
        return
    yield "| result | value |"
    yield "|---|---|"
    for path, value in rows:
        yield f"| {' / '.join(path)} | {_num(value)} |"
    yield ""


def _leaves(tree: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], float]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(tree, bool):
        return
    elif isinstance(tree, int | float) and path:
        yield path, float(tree)


def _privacy(summary: Mapping[str, Any]) -> Iterator[str]:
    section = summary.get("privacy") or {"mechanism": "none", "guarantee": "not recorded by this run"}
    yield "## Privacy"
    yield ""
    for key, label in PRIVACY_FIELDS:
        if section.get(key) is not None:
            yield f"- {label}: {_num(section[key]) if isinstance(section[key], float) else section[key]}"
    secure = summary.get("secure_aggregation")
    if secure:
        yield f"- secure aggregation: {secure.get('protocol')} in rounds {secure.get('rounds')}; {secure.get('trust')}"
    yield ""


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    number = float(value)
    return str(number) if math.isinf(number) or math.isnan(number) else f"{number:.4g}"
