"""``fedtune evaluate``: a run's model on lm-evaluation-harness tasks (``fedtune.model.lm_evaluate`` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedtune evaluate OUT [--tasks T1,T2] [--suite NAME] [--limit N] [--base]``."""
    parser = sub.add_parser(
        "evaluate", help="evaluate a run's model with lm-evaluation-harness (pip install 'fedtune[eval]')"
    )
    parser.add_argument("run", metavar="OUT", help="a finished run's directory")
    parser.add_argument("--tasks", help="comma-separated lm-eval task names (default: the run's own held-out set)")
    parser.add_argument("--suite", choices=["medical", "finance", "general"], help="add a domain's lm-eval tasks")
    parser.add_argument("--limit", type=int, help="at most N examples per task")
    parser.add_argument("--base", action="store_true", help="evaluate the base model alone (OUT/eval/<task>-base.json)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (auto)")
    parser.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    from fedtune.core.errors import ConfigError
    from fedtune.model.finished import open_run
    from fedtune.model.lm_evaluate import chosen_tasks, evaluate_run, require_lm_eval, side_by_side, tables
    from fedtune.model.loading import pick_device

    require_lm_eval()
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"`--limit` must be >= 1, got {args.limit}.")
    run = open_run(Path(args.run))
    tasks = chosen_tasks(args.tasks, args.suite)
    results = evaluate_run(run, tasks, limit=args.limit, base=args.base, device=str(pick_device(args.device)))
    print(tables(results))
    which = "base model" if args.base else "fine-tuned model"
    print(f"Results of the {which} in {run.out / 'eval'} ({', '.join(tasks)}).")
    for line in side_by_side(run.out / "eval", tasks):
        print(line)
