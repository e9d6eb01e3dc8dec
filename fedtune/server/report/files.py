"""What a run leaves in OUT as rounds finish and at the end: ``metrics.jsonl``, ``rounds.md``, the loss plot
and ``summary.json``, all from the rounds' records."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.model.task_metrics import LOSS
from fedtune.server.record import RoundRecord
from fedtune.server.report.table import COLUMNS, Column, columns, config_tree, markdown, table_header, table_row

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "rounds.md"


class Reporter:
    """Writes ``metrics.jsonl`` as rounds finish and prints the table rows."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / METRICS_FILE
        self.cols: list[Column] = list(COLUMNS)

    def start(self, plan: Plan) -> None:
        """Log the config tree, the plan table (if any) and the round table's header."""
        rounds = [plan.base, *plan.configs()]
        metrics = list(dict.fromkeys(m for cfg in rounds for m in cfg.eval.metric_names()))
        self.cols = columns(metrics, asynchronous=plan.base.server.mode == "async")
        log.info("%s", config_tree(plan.base))
        if plan.entries:
            log.info(
                "Round plan:\n%s",
                "\n".join(f"  rounds {span:>7} | {changes}" for span, changes in plan.table()),
            )
        log.info("%s", table_header(self.cols))

    def truncate(self, last_round: int) -> None:
        """Keep only rounds up to ``last_round`` in ``metrics.jsonl`` (before resuming)."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["round"] <= last_round]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def row(self, record: RoundRecord) -> dict[str, Any]:
        """Append the round to ``metrics.jsonl``, print its table line; returns the object written."""
        row = record.to_json()
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        log.info("%s", table_row(record, self.cols))
        return row

    def finish(self, cfg: RunConfig, history: list[RoundRecord], extra: dict[str, Any]) -> None:
        """Write the round table (markdown), the loss plot and ``summary.json``."""
        (self.out / TABLE_FILE).write_text(markdown(history, self.cols))
        plot_losses(history, self.out / "plots" / "loss.png")
        text = json.dumps(summary(cfg, history, extra), indent=2, default=str)
        (self.out / SUMMARY_FILE).write_text(text + "\n")


def summary(cfg: RunConfig, history: Sequence[RoundRecord], extra: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``: the final round, the eval loss's first, last and relative drop, totals, ``extra``
    and the config."""
    evals = [loss for r in history if (loss := r.score(LOSS)) is not None]
    return {
        "rounds": cfg.num_server_rounds,
        "final": history[-1].to_json() if history else None,
        "eval_loss_first": evals[0] if evals else None,
        "eval_loss_last": evals[-1] if evals else None,
        "eval_loss_drop": (1 - evals[-1] / evals[0]) if len(evals) > 1 and evals[0] else None,
        "bytes_up_total": sum(r.bytes_up for r in history),
        "bytes_down_total": sum(r.bytes_down for r in history),
        "seconds_total": sum(r.seconds or 0.0 for r in history),
        **extra,
        "config": cfg.to_flat(),
    }


def plot_losses(history: Sequence[RoundRecord], path: Path) -> None:
    """Train and eval loss per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = [
        ("train (sites)", [(r.round, r.train_loss) for r in history]),
        ("eval (server held-out)", [(r.round, s.central) for r in history if (s := r.scores.get(LOSS))]),
        ("eval (sites' held-out)", [(r.round, s.federated) for r in history if (s := r.scores.get(LOSS))]),
    ]
    for label, pairs in lines:
        points = [(x, y) for x, y in pairs if y is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss per response token")
    ax.set_title("fedtune: loss per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
