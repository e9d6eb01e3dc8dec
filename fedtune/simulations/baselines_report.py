"""What the baselines leave: ``OUT/baselines.json``, the console table, ``OUT/plots/baselines.png`` and
the headline line (the share of the pooled gain federation recovers, and the sites where federated
beats local-only on their own held-out set)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.config.baselines import CENTRALIZED
from fedtune.model.task_metrics import LOSS

log = logging.getLogger(__name__)

BASELINES_FILE = "baselines.json"
PLOT_FILE = "plots/baselines.png"
SERVER = "server"
NON_PRIVATE = (
    "non-private: the baselines train without differential privacy (local-only on each site's data, "
    "centralized on the pooled data, which the federation never sees); only the federated row carries a guarantee"
)
Evals = Mapping[str, Mapping[str, Mapping[str, float]]]
_ROWS = (("base", "base"), ("federated", "federated"), (CENTRALIZED, CENTRALIZED), ("local", "local-only"))


def _better(a: float, b: float, lower: bool) -> bool:
    return a < b if lower else a > b


def _spread(values: Sequence[float], lower: bool) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "worst": max(values) if lower else min(values)}


def _metric(name: str, evals: Evals, sites: Sequence[str]) -> dict[str, Any]:
    """One metric's values: on the server's set (base, federated, centralized, local-only per site
    with mean and worst) and on each site's own held-out split."""
    lower = name == LOSS

    def get(row: str, where: str) -> float | None:
        return evals.get(row, {}).get(where, {}).get(name)

    out: dict[str, Any] = {"lower_is_better": lower}
    if get("federated", SERVER) is not None:
        server: dict[str, Any] = {r: get(r, SERVER) for r in ("base", "federated", CENTRALIZED)}
        local = {s: v for s in sites if (v := get(f"local {s}", SERVER)) is not None}
        if local:
            server["local"] = {"sites": local, **_spread(list(local.values()), lower)}
        out[SERVER] = {k: v for k, v in server.items() if v is not None}
    per_site: dict[str, dict[str, float]] = {}
    for s in sites:
        entry = {"base": get("base", s), "federated": get("federated", s), CENTRALIZED: get(CENTRALIZED, s)}
        entry["local"] = get(f"local {s}", s)
        per_site[s] = {k: v for k, v in entry.items() if v is not None}
    out["sites"] = per_site
    for row in ("federated", "local"):
        values = [e[row] for e in per_site.values() if row in e]
        if values:
            out[f"{row}_own_heldout"] = _spread(values, lower)
    return out


def headline(name: str, metric: Mapping[str, Any]) -> dict[str, Any]:
    """(base - fed) / (base - pooled) on the server's set (else the mean over the sites' held-out
    splits), and the sites where federated beats local-only on their own held-out split."""
    lower = bool(metric["lower_is_better"])
    if SERVER in metric:
        where, ref = "the server's held-out set", dict(metric[SERVER])
    else:
        where, ref = "the sites' held-out splits (mean)", {}
        for row in ("base", "federated", CENTRALIZED):
            values = [e[row] for e in metric["sites"].values() if row in e]
            if values:
                ref[row] = sum(values) / len(values)
    base, fed, pooled = ref.get("base"), ref.get("federated"), ref.get(CENTRALIZED)
    share = None
    if base is not None and fed is not None and pooled is not None and base != pooled:
        share = (base - fed) / (base - pooled)
    compared = {s: e for s, e in metric["sites"].items() if "local" in e and "federated" in e}
    beats = sorted(s for s, e in compared.items() if _better(e["federated"], e["local"], lower))
    out = {"metric": name, "on": where, "base": base, "federated": fed, "pooled": pooled, "recovered": share}
    out.update(sites_compared=len(compared), sites_federated_beats_local=len(beats), sites_beaten=beats)
    return out


def headline_line(h: Mapping[str, Any]) -> str:
    """The headline as one line."""
    parts = [f"Did federation help? {h['metric']} on {h['on']}:"]
    if h["recovered"] is not None:
        parts.append(
            f"federation recovers {h['recovered']:.1%} of the pooled gain ((base - fed) / (base - pooled) = "
            f"({h['base']:.4f} - {h['federated']:.4f}) / ({h['base']:.4f} - {h['pooled']:.4f}) = {h['recovered']:.3f})"
        )
    elif h["pooled"] is not None:
        parts.append("the pooled model did not move from the base, so no share of its gain is defined")
    if h["sites_compared"]:
        parts.append(
            f"{';' if len(parts) > 1 else ''} federated beats local-only on {h['sites_federated_beats_local']} of "
            f"{h['sites_compared']} sites' own held-out sets"
        )
    return " ".join(parts).replace(" ;", ";") + "."


def _privacy(section: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not section or section.get("mechanism") in (None, "none"):
        return None
    federated = {k: section.get(k) for k in ("mechanism", "unit", "epsilon", "delta")}
    return {"federated": federated, "baselines": NON_PRIVATE}


def build(
    cfg: RunConfig,
    evals: Evals,
    sites: Sequence[str],
    federated_steps: Mapping[str, int],
    trained: Mapping[str, int],
    privacy: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """``baselines.json``'s content."""
    names = cfg.eval.metric_names()
    metrics = {name: _metric(name, evals, sites) for name in names}
    steps: dict[str, Any] = {"federated": dict(federated_steps)}
    if any(s in trained for s in sites):
        steps["local"] = {s: trained[s] for s in sites if s in trained}
    if CENTRALIZED in trained:
        steps[CENTRALIZED] = trained[CENTRALIZED]
    out: dict[str, Any] = {"baselines": cfg.baselines, "metrics": metrics, "steps": steps}
    out["headline"] = headline(names[0], metrics[names[0]])
    out["privacy"] = _privacy(privacy)
    return out


def _label(row: str, privacy: Mapping[str, Any] | None) -> str:
    if privacy is None:
        return row
    if row == "federated":
        fed = privacy["federated"]
        eps = fed["epsilon"]
        eps_text = f"{eps:.2f}" if isinstance(eps, int | float) else str(eps)
        return f"federated ({fed['mechanism']}, epsilon {eps_text}, delta {fed['delta']:g})"
    return row if row == "base" else f"{row} (non-private)"


def table(result: Mapping[str, Any]) -> str:
    """The console table (markdown): one block per metric, a column per held-out set."""
    privacy = result.get("privacy")
    blocks = []
    for name, metric in result["metrics"].items():
        sites = list(metric["sites"])
        cols = ([SERVER] if SERVER in metric else []) + sites
        direction = "lower" if metric["lower_is_better"] else "higher"
        lines = [f"| {name} ({direction} is better) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for key, row in _ROWS:
            cells = []
            for col in cols:
                value = metric[SERVER].get(key) if col == SERVER else metric["sites"][col].get(key)
                if isinstance(value, dict):  # local-only on the server's set: each site's model
                    value = f"{value['mean']:.4f} mean, {value['worst']:.4f} worst"
                cells.append("-" if value is None else value if isinstance(value, str) else f"{value:.4f}")
            if any(c != "-" for c in cells):
                lines.append(f"| {_label(row, privacy)} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot(result: Mapping[str, Any], path: Path) -> None:
    """Grouped bars per metric: base, federated, centralized and local-only on each held-out set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
    for ax, (name, metric) in zip(axes[0], metrics.items(), strict=True):
        cols = ([SERVER] if SERVER in metric else []) + list(metric["sites"])
        for i, (row, label) in enumerate(_ROWS):
            values = []
            for col in cols:
                value = metric[SERVER].get(row) if col == SERVER else metric["sites"][col].get(row)
                values.append(value["mean"] if isinstance(value, dict) else value)
            xs = [j + i * 0.2 for j, v in enumerate(values) if v is not None]
            if xs:
                ax.bar(xs, [v for v in values if v is not None], width=0.2, label=label)
        ax.set_xticks([j + 0.3 for j in range(len(cols))], cols, rotation=30)
        ax.set_title(f"{name} ({'lower' if metric['lower_is_better'] else 'higher'} is better)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: Path, result: Mapping[str, Any]) -> None:
    """``OUT/baselines.json`` and ``OUT/plots/baselines.png``; log the table and the headline line."""
    (out / BASELINES_FILE).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / PLOT_FILE)
    if result.get("privacy"):
        log.info("Baselines are %s.", NON_PRIVATE)
    log.info("\n%s\n\n%s", table(result), headline_line(result["headline"]))
    log.info("Baselines in %s (%s, %s)", out, BASELINES_FILE, PLOT_FILE)
