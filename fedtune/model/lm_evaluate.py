"""``fedtune evaluate``: a finished run's model (or its base) on lm-evaluation-harness tasks.

lm-eval loads the model itself, through its Hugging Face model (``HFLM``) with the run's PEFT
adapter (``peft=OUT/adapter``), or the whole fine-tuned model for bitfit / full. Without
``--tasks`` it runs the run's own held-out set as a task fedtune generates (offline). Each task's
results go to ``OUT/eval/<task>.json`` (``<task>-base.json`` for the base model).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedtune.core.errors import ConfigError, DataError, ModelError
from fedtune.data.loaders import load_eval_records
from fedtune.model.card import EVAL_DIR
from fedtune.model.finished import FinishedRun, read_json
from fedtune.model.heldout_task import TASK_NAME, write_heldout_task
from fedtune.model.sources import load_tokenizer

log = logging.getLogger(__name__)

INSTALL = "`fedtune evaluate` needs lm-evaluation-harness: pip install 'fedtune[eval]' (or pip install lm-eval)."
TASKS_DIR = "tasks"
# Domains federated LLM leaderboards report on, as lm-eval task names; only those the installed
# lm-eval defines are used. Medical: the Open Medical-LLM Leaderboard's set (MedQA, MedMCQA,
# PubMedQA, the medical MMLU subjects); finance: financial tweet sentiment and the finance MMLU
# subjects; general: MMLU.
SUITES: dict[str, tuple[str, ...]] = {
    "medical": (
        "medqa_4options",
        "medmcqa",
        "pubmedqa",
        "mmlu_anatomy",
        "mmlu_clinical_knowledge",
        "mmlu_college_biology",
        "mmlu_college_medicine",
        "mmlu_medical_genetics",
        "mmlu_professional_medicine",
    ),
    "finance": (
        "financial_tweets",
        "mmlu_econometrics",
        "mmlu_high_school_macroeconomics",
        "mmlu_high_school_microeconomics",
        "mmlu_professional_accounting",
    ),
    "general": ("mmlu",),
}


def require_lm_eval() -> None:
    """One line saying how to install lm-eval when it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL) from None


def suite_tasks(suite: str, known: Iterable[str]) -> list[str]:
    """The suite's task names that ``known`` (the installed lm-eval's tasks) defines."""
    if suite not in SUITES:
        raise ConfigError(f"`--suite` must be one of {', '.join(SUITES)}, got {suite!r}.")
    names = set(known)
    chosen = [t for t in SUITES[suite] if t in names]
    if not chosen:
        raise ConfigError(f"`--suite` {suite}: the installed lm-eval defines none of {', '.join(SUITES[suite])}.")
    return chosen


def chosen_tasks(tasks: str | None, suite: str | None) -> list[str]:
    """``--tasks`` (comma-separated) plus ``--suite``'s tasks, in order; the held-out task when neither is given."""
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if suite:
        names += [t for t in suite_tasks(suite, installed_tasks().all_tasks) if t not in names]
    return names or [TASK_NAME]


@functools.cache
def installed_tasks() -> Any:
    """lm-eval's TaskManager over the tasks it ships, built once per process: building it parses every
    task YAML of the installed lm-eval (about 10 s on one core), which nothing in a run changes."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_manager(run: FinishedRun, tasks: list[str]) -> Any:
    """lm-eval's TaskManager: the generated held-out task (when asked for) plus, for any other name, lm-eval's own.
    Unknown names are refused before the held-out task is written."""
    from lm_eval.tasks import TaskManager

    others = [t for t in tasks if t != TASK_NAME]
    unknown = [t for t in others if t not in installed_tasks().all_tasks] if others else []
    if unknown:
        raise ConfigError(f"`--tasks`: the installed lm-eval defines no task {unknown[0]!r} (see `lm_eval ls tasks`).")
    if TASK_NAME not in tasks:
        return installed_tasks()
    include = str(write_task(run).parent)
    manager = TaskManager(include_path=include, include_defaults=bool(others))
    if TASK_NAME not in manager.all_tasks:
        raise ConfigError(f"`--tasks`: lm-eval did not load the held-out task written to {include}.")
    return manager


def write_task(run: FinishedRun) -> Path:
    """The held-out task folder under ``OUT/eval/tasks/``, from the server's held-out set."""
    records = load_eval_records(run.cfg.data)
    if records is None or len(records) == 0:
        raise ConfigError(
            f"{run.out}: the run has no server held-out set (`data.eval-path`); name lm-eval tasks with --tasks."
        )
    tokenizer = load_tokenizer(run.base_path())
    directory = run.out / EVAL_DIR / TASKS_DIR / TASK_NAME
    return write_heldout_task(
        directory, list(records), run.cfg.data, tokenizer, max_new_tokens=run.cfg.eval.max_new_tokens
    )


def model_args(run: FinishedRun, *, base: bool, device: str) -> dict[str, Any]:
    """HFLM's arguments: the base (+ the run's adapter), or the run's whole model, in fp32 on ``device``."""
    args: dict[str, Any] = {
        "pretrained": run.base_path() if base or run.peft else str(run.weights),
        "tokenizer": run.base_path(),
        "dtype": "float32",
        "device": device,
        "batch_size": run.cfg.eval.batch_size,
    }
    if run.peft and not base:
        args["peft"] = str(run.weights)
    return args


def evaluate_run(run: FinishedRun, tasks: list[str], *, limit: int | None, base: bool, device: str) -> dict[str, Any]:
    """Run lm-eval on ``tasks``, write ``OUT/eval/<task>[-base].json`` for each; returns lm-eval's results."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(run, tasks)
    try:
        lm = HFLM(**model_args(run, base=base, device=device))
    except (OSError, ValueError) as exc:
        raise ModelError(f"lm-eval cannot load the model of {run.out}: {str(exc).splitlines()[0]}") from None
    try:
        results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    except ConnectionError as exc:
        raise DataError(
            f"`--tasks` {','.join(tasks)}: lm-eval could not fetch a task's data ({str(exc).splitlines()[0]}); "
            "hub tasks need the network and HF_HUB_OFFLINE=0."
        ) from None
    if results is None:
        raise ModelError("lm-eval returned no results.")
    out = run.out / EVAL_DIR
    for task in tasks:
        path = out / f"{task}{'-base' if base else ''}.json"
        path.write_text(json.dumps(task_file(results, task, base=base, limit=limit), indent=2, default=str) + "\n")
    return dict(results)


def members(results: Mapping[str, Any], task: str) -> list[str]:
    """``task`` and, for a group (MMLU), every subtask under it."""
    out = [task]
    for sub in results.get("group_subtasks", {}).get(task, []):
        out += members(results, sub)
    return out


def task_file(results: Mapping[str, Any], task: str, *, base: bool, limit: int | None) -> dict[str, Any]:
    """What ``OUT/eval/<task>.json`` holds: lm-eval's results, versions and sample counts for the task."""
    names = [n for n in members(results, task) if n in results.get("results", {})]
    pick = {key: {n: results[key][n] for n in names if n in results.get(key, {})} for key in ("versions", "n-samples")}
    return {
        "task": task,
        "model": "base" if base else "fine-tuned",
        "limit": limit,
        "results": {n: results["results"][n] for n in names},
        **pick,
    }


def side_by_side(out: Path, tasks: list[str]) -> list[str]:
    """``task metric: base X -> fine-tuned Y`` for each metric that both ``<task>-base.json`` and
    ``<task>.json`` hold in ``out`` (empty until both models have been evaluated)."""
    lines = []
    for task in tasks:
        base, tuned = (read_json(out / f"{task}{suffix}.json") for suffix in ("-base", ""))
        if not isinstance(base, Mapping) or not isinstance(tuned, Mapping):
            continue
        old, new = base.get("results", {}).get(task, {}), tuned.get("results", {}).get(task, {})
        for key, value in new.items():
            if "_stderr" not in key and isinstance(value, float) and isinstance(old.get(key), float):
                lines.append(f"{task} {key}: base {old[key]:.4f} -> fine-tuned {value:.4f}")
    return lines


def tables(results: Mapping[str, Any]) -> str:
    """lm-eval's own results table (and its groups table when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return str(text)
