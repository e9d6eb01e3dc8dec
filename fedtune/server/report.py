"""What a run shows and leaves behind: config tree, per-round table, metrics.jsonl, plots, summary."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.tree import Tree

from fedtune.config import RunConfig
from fedtune.config.plan import Plan
from fedtune.model.task_metrics import GENERATED, column
from fedtune.privacy import rounds as privacy
from fedtune.privacy.accounting import Event
from fedtune.privacy.mechanisms import MECHANISMS
from fedtune.privacy.skellam import SkellamEvent
from fedtune.server.state import ServerState

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "rounds.md"

# (header, row key, width, format)
COLUMNS: list[tuple[str, str, int, str]] = [
    ("round", "round", 5, "d"),
    ("sampled", "sampled", 7, "d"),
    ("replied", "replied", 7, "d"),
    ("failed", "failed", 6, "d"),
    ("train_loss", "train_loss", 10, ".4f"),
    ("eval_loss", "eval_loss", 9, ".4f"),
    ("epsilon", "epsilon", 7, ".3f"),
    ("up", "bytes_up", 9, "bytes"),
    ("down", "bytes_down", 9, "bytes"),
    ("seconds", "seconds", 7, ".1f"),
]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    if fmt == "bytes":
        return human_bytes(float(value))
    return format(value, fmt)


Column = tuple[str, str, int, str]


def columns(metrics: Sequence[str] = ()) -> list[Column]:
    """The table's columns: :data:`COLUMNS`, with one column per task metric after ``eval_loss``."""
    extra = [(column(m), column(m), max(len(column(m)), 6), ".3f") for m in metrics if m in GENERATED]
    at = [k for _, k, _, _ in COLUMNS].index("eval_loss") + 1
    return COLUMNS[:at] + extra + COLUMNS[at:]


def table_header(cols: Sequence[Column] = COLUMNS) -> str:
    """The per-round table's header line."""
    return " | ".join(h.rjust(w) for h, _, w, _ in cols)


def table_row(row: dict[str, Any], cols: Sequence[Column] = COLUMNS) -> str:
    """One round as a table line."""
    return " | ".join(_cell(row.get(k), f).rjust(w) for _, k, w, f in cols)


def config_tree(cfg: RunConfig) -> str:
    """The effective config as a tree, one branch per section."""
    tree = Tree("[bold]fedtune run config[/bold]")
    sections: dict[str, Tree] = {}
    for key, value in cfg.to_flat().items():
        section, _, name = key.rpartition(".")
        if section and section not in sections:
            sections[section] = tree.add(f"[bold]{section}[/bold]")
        (sections[section] if section else tree).add(f"{name} = {value!r}")
    console = Console(width=100, record=True, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(tree)
    return cap.get().rstrip()


class Reporter:
    """Writes ``metrics.jsonl`` as rounds finish and prints the table rows."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / METRICS_FILE
        self.cols: list[Column] = list(COLUMNS)

    def start(self, plan: Plan) -> None:
        """Log the config tree, the plan table (if any) and the round table's header."""
        rounds = [plan.base, *(plan.for_round(r) for r in range(1, plan.base.num_server_rounds + 1))]
        self.cols = columns(list(dict.fromkeys(m for cfg in rounds for m in cfg.eval.metric_names())))
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

    def row(self, row: dict[str, Any]) -> None:
        """Append the round to ``metrics.jsonl`` and print its table line."""
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        log.info("%s", table_row(row, self.cols))

    def finish(self, cfg: RunConfig, history: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        """Write the round table (markdown), the loss plot and ``summary.json``."""
        cols = self.cols
        lines = ["| " + " | ".join(h for h, _, _, _ in cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(k), f) for _, k, _, f in cols) + " |" for r in history]
        (self.out / TABLE_FILE).write_text("\n".join(lines) + "\n")
        plot_losses(history, self.out / "plots" / "loss.png")
        evals = [r["eval_loss"] for r in history if r.get("eval_loss") is not None]
        summary = {
            "rounds": cfg.num_server_rounds,
            "final": history[-1] if history else None,
            "eval_loss_first": evals[0] if evals else None,
            "eval_loss_last": evals[-1] if evals else None,
            "eval_loss_drop": (1 - evals[-1] / evals[0]) if len(evals) > 1 and evals[0] else None,
            "bytes_up_total": sum(r.get("bytes_up", 0) for r in history),
            "bytes_down_total": sum(r.get("bytes_down", 0) for r in history),
            "seconds_total": sum(r.get("seconds", 0.0) for r in history),
            **extra,
            "config": cfg.to_flat(),
        }
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Train and eval loss per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [
        ("train_loss", "train (sites)"),
        ("eval_loss_central", "eval (server held-out)"),
        ("eval_loss_federated", "eval (sites' held-out)"),
    ]:
        points = [(r["round"], r[key]) for r in history if r.get(key) is not None]
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


DISTRIBUTED_COLLUSION = (
    "Each share is sized so that m = max(secagg threshold, `server.min-replies`) shares carry the target noise "
    "(a round with fewer survivors is abandoned). A client colluding with the server reveals its own share. "
    "`epsilon_under_collusion` charges every round only its target noise: it holds as long as, in every round, "
    "the clients that dropped after sending their key shares plus the survivors colluding with the server number "
    "at most n - m (n: the clients that sent their key shares). `epsilon` assumes no survivor colludes."
)
SAMPLE_SECRET = (
    "Amplification by client sampling (q = {q}) assumes nobody but the server knows who was sampled: the server "
    "draws the sample from OS entropy (never from `seed`; the sampler is never checkpointed) and no output names "
    "the sampled or replying nodes (`output.log-participants` = false)"
)
SAMPLE_LOGGED = (
    "`output.log-participants` = true writes the sampled and replying node ids to metrics.jsonl, summary.json, "
    "the checkpoints and the log: amplification by client sampling (q = {q}) then assumes those outputs stay "
    "secret from the adversary"
)
NOT_COVERED = "Not covered: dataset sizes (public, as in Opacus), the wall-clock seconds the server measures"
FEDERATED_EVAL = (
    ", and the per-site held-out loss and task metrics (`eval.metrics`) that federated evaluation "
    "(`eval.federated` = true) reports without noise."
)
NO_FEDERATED_EVAL = "; federated evaluation is off (`eval.federated`), so no per-site metrics are reported."


def json_number(value: float | None) -> float | str | None:
    """``value`` for JSON: infinity as the string "inf" (JSON has no infinity)."""
    return "inf" if value is not None and math.isinf(value) else value


def trust(plan: Plan, family: str) -> str:
    """The trust statement: the mechanism's, plus what amplification by client sampling assumes."""
    text = MECHANISMS.get(family).trust
    if privacy.secret_sample(plan):
        q = plan.base.server.fraction_train
        text += ". " + (SAMPLE_LOGGED if plan.base.output.log_participants else SAMPLE_SECRET).format(q=q)
    return text


def covers(plan: Plan, family: str) -> str:
    """What the guarantee covers and what it does not (per-site metrics when federated evaluation runs)."""
    rounds = [plan.base, *(plan.for_round(r) for r in range(1, plan.base.num_server_rounds + 1))]
    evaluated = any(privacy.federated_eval(plan, cfg) for cfg in rounds)
    unit = (
        "each training example of each site. "
        if MECHANISMS.get(family).site_ledger
        else "each site's training data as a whole. "
    )
    return unit + NOT_COVERED + (FEDERATED_EVAL if evaluated else NO_FEDERATED_EVAL)


def _event_json(e: Event) -> dict[str, Any]:
    if isinstance(e, SkellamEvent):
        return {"skellam_mu": e.mu, "l1_sensitivity": e.l1, "l2_sensitivity": e.l2, "rounds": e.steps}
    return {"noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "rounds": e.steps}


def privacy_summary(plan: Plan, state: ServerState) -> dict[str, Any]:
    """``summary.json``'s privacy section: each guarantee with its unit, or why there is none."""
    family = privacy.unit(plan)
    if family is None:
        return {"mechanism": "none", "guarantee": "none: updates were sent and released without noise"}
    p = plan.base.privacy
    eps = state.privacy.epsilon(plan.base, family)
    out: dict[str, Any] = {
        "mechanism": family,
        "unit": MECHANISMS.get(family).unit,
        "epsilon": json_number(eps),
        "delta": p.delta,
        "accountant": p.accountant,
        "target_epsilon": p.target_epsilon or None,
        "guarantee_holds": eps is not None and math.isfinite(eps),
        "trust": trust(plan, family),
        "covers": covers(plan, family),
        "stopped": state.privacy.stopped,
    }
    if state.privacy.ledger.unprotected:
        out["why_not"] = (
            f"rounds {state.privacy.ledger.unprotected} released un-noised updates (`privacy.mechanism` = none)"
        )
    elif eps is not None and math.isinf(eps):
        out["why_not"] = "a round used `privacy.noise-multiplier` = 0"
    if MECHANISMS.get(family).site_ledger:
        out["sites"] = {str(k): json_number(v) for k, v in sorted(state.privacy.site_epsilon.items())}
        out["sites_exhausted"] = sorted(state.privacy.exhausted)
    else:
        out["events"] = [_event_json(e) for e in state.privacy.ledger.events]
        poisson = plan.base.server.sampling == "poisson"
        out["client_sampling"] = (
            "fixed-size: no amplification claimed (q = 1)"
            if not poisson
            else "poisson, but no amplification claimed (q = 1)"
            if MECHANISMS.get(family).noise_in_sum
            else f"poisson, q = {plan.base.server.fraction_train}"
        )
    if MECHANISMS.get(family).noise_in_sum:
        floor = state.privacy.floor.epsilon(p.delta, p.accountant)
        out["epsilon_under_collusion"] = json_number(floor)
        out["collusion"] = DISTRIBUTED_COLLUSION
    return out


def secagg_summary(plan: Plan) -> dict[str, Any] | None:
    """``summary.json``'s secure-aggregation section: which rounds, and what the server still learns."""
    rounds = [r for r in range(1, plan.base.num_server_rounds + 1) if plan.for_round(r).secagg.protocol != "none"]
    if not rounds:
        return None
    return {
        "protocol": "secagg (SecAgg+, Bell et al. 2020)",
        "rounds": rounds,
        "trust": "honest-but-curious server: it learns the sum of the surviving clients' quantized updates "
        "and nothing about any one update, as long as fewer than the threshold of a client's share holders "
        "collude with it (with mixed LoRA ranks, each rank band is a sum over at least the threshold of them, "
        "else the round is abandoned)",
        "server_still_learns": "who was sampled and who replied at each stage, each client's number of "
        "examples and LoRA rank, and the sum"
        + (
            " (in `privacy.mechanism` = distributed rounds, a sum that already carries the clients' noise shares)"
            if any(MECHANISMS.get(plan.for_round(r).privacy.mechanism).noise_in_sum for r in rounds)
            else ""
        ),
    }


def privacy_line(section: dict[str, Any]) -> str:
    """One plain sentence for the log."""
    if not MECHANISMS.get(section["mechanism"]).dp:
        return "Privacy: no formal guarantee (privacy.mechanism = none)."
    if not section["guarantee_holds"]:
        return f"Privacy: NO finite guarantee ({section.get('why_not', 'epsilon is infinite')})."
    return (
        f"Privacy ({section['mechanism']}): epsilon = {section['epsilon']:.3f} at delta = {section['delta']:g} "
        f"({section['accountant']}), {section['unit']}."
    )
