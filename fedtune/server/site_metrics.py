"""Per-site evaluation metrics and data-check counts: decoding replies, combining them into a
round's columns, and ``OUT/sites.json`` (each site's latest scores and their spread across sites)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtune.core.errors import UpdateRejected
from fedtune.model.task_metrics import GENERATED, LOSS, column
from fedtune.server.record import RoundRecord, Score
from fedtune.server.validation import example_count
from fedtune.wire import keys

SITES_FILE = "sites.json"
NOT_COVERED = (
    "Not covered by the run's differential-privacy guarantee: each site's held-out loss and task metrics "
    "(`eval.metrics`) are reported without noise (`eval.federated = false` turns them off)."
)
CHECK_NAMES = ("malformed", "empty", "duplicates", "too_long", "prompts_cut", "responses_too_long")
NEWER_CHECKS = ("prompts_cut", "responses_too_long")  # a site from before `data.truncation` lacks them
PERSONAL_LOSS = "personal_eval_loss"  # a site's personal adapter (``lora.share = a``, ``personalize.local-steps``)


def _number(metrics: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    """``metrics[key]`` (None if absent); UpdateRejected unless it is a number in [low, high]."""
    value = metrics.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise UpdateRejected(f"'{key}' must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def eval_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One site's eval reply as ``metrics.jsonl`` and ``sites.json`` carry it; UpdateRejected naming
    the first value that is missing or out of range (a loss must be finite and >= 0, a task metric in
    [0, 1], a count a whole number in 1..``MAX_EXAMPLES``)."""
    entry: dict[str, Any] = {"num_examples": example_count(metrics)}
    if (loss := _number(metrics, keys.EVAL_LOSS, 0.0, sys.float_info.max)) is not None:
        entry[column(LOSS)] = loss
    if (personal := _number(metrics, keys.PERSONAL_EVAL_LOSS, 0.0, sys.float_info.max)) is not None:
        entry[PERSONAL_LOSS] = personal
    if keys.NUM_GENERATED in metrics:
        entry["num_generated"] = example_count(metrics, keys.NUM_GENERATED)
        for name in GENERATED:
            if (value := _number(metrics, name, 0.0, 1.0)) is not None:
                entry[column(name)] = value
    return entry


def weighted_mean(pairs: Sequence[tuple[float, float]]) -> float:
    """sum(v w) / sum(w) of (value, weight > 0) pairs, computed as a convex combination and kept within
    [min v, max v], so finite values never overflow to inf however large they are."""
    total = sum(w for _, w in pairs)
    mean = sum(v * (w / total) for v, w in pairs)
    return min(max(mean, min(v for v, _ in pairs)), max(v for v, _ in pairs))


def combine(entries: Mapping[int, Mapping[str, Any]]) -> dict[str, float]:
    """The federation's value of each metric, by metric name: the loss weighted by held-out
    examples, the task metrics by answers generated (as one pooled held-out set would give)."""
    out: dict[str, float] = {}
    for name in (LOSS, *GENERATED):
        weight_key = "num_examples" if name == LOSS else "num_generated"
        pairs = [(e[column(name)], e[weight_key]) for e in entries.values() if column(name) in e]
        if pairs:
            out[name] = weighted_mean(pairs)
    return out


def scores(names: Sequence[str], central: Mapping[str, float], federated: Mapping[str, float]) -> dict[str, Score]:
    """A round's evaluation scores by metric name: the loss always, then each of ``names``, each with its
    central and federated value (``metrics.jsonl``: ``<m>_central``, ``<m>_federated`` and ``<m>``)."""
    return {name: Score(central.get(name), federated.get(name)) for name in dict.fromkeys([LOSS, *names])}


def data_checks(metrics: Mapping[str, Any]) -> dict[str, int] | None:
    """The data-check counts a train reply carries, or None when it carries none (under DP)."""
    found: dict[str, int] = {}
    for name in CHECK_NAMES:
        value = metrics.get(keys.DATA_CHECK + name.replace("_", "-"))
        if value is None and name in NEWER_CHECKS:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None
        found[name] = value
    return found


def sites_report(history: Sequence[RoundRecord], privacy_note: str | None) -> dict[str, Any]:
    """``sites.json``: each site's latest eval scores (with the round and example counts; under
    personalization its personal adapter's loss ``personal_eval_loss`` beside the global one's
    ``eval_loss``) and latest data-check counts, and per metric the spread across sites (unweighted: each site counts
    once, so an unfair model shows as a wide spread)."""
    sites: dict[str, dict[str, Any]] = {}
    for record in history:
        for node, entry in (record.sites_eval or {}).items():
            sites.setdefault(str(node), {})["eval"] = {"round": record.round, **entry}
        for node, counts in (record.data_checks or {}).items():
            sites.setdefault(str(node), {})["data_checks"] = {"round": record.round, **counts}
    spread: dict[str, dict[str, float | int]] = {}
    for name in (column(LOSS), PERSONAL_LOSS, *map(column, GENERATED)):
        values = [s["eval"][name] for s in sites.values() if name in s.get("eval", {})]
        if values:
            spread[name] = {
                "min": min(values),
                "max": max(values),
                "mean": sum(values) / len(values),
                "sites": len(values),
            }
    out: dict[str, Any] = {"sites": dict(sorted(sites.items(), key=lambda kv: int(kv[0]))), "spread": spread}
    if privacy_note:
        out["privacy"] = privacy_note
    return out


def write_sites(out: Path, history: Sequence[RoundRecord], privacy_note: str | None) -> None:
    """Write ``OUT/sites.json`` atomically (temp file, then rename)."""
    path = out / SITES_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sites_report(history, privacy_note), indent=2) + "\n")
    tmp.replace(path)


def base_vs_final(history: Sequence[RoundRecord]) -> dict[str, Any] | None:
    """``summary.json``'s ``task_metrics``: each task metric of the base model (round 0) and of the
    final model (the last round that computed it), or None when no round computed any."""
    names = [m for m in GENERATED if any(r.score(m) is not None for r in history)]
    if not names or not history or history[0].round != 0:
        return None
    last = next(r for r in reversed(history) if any(r.score(n) is not None for n in names))
    return {
        "final_round": last.round,
        "base": {column(n): history[0].score(n) for n in names},
        "final": {column(n): last.score(n) for n in names},
    }


def base_vs_final_line(section: Mapping[str, Any]) -> str:
    """One log line: ``rouge_l 0.213 -> 0.871`` per metric."""
    parts = [f"{n} {_fmt(section['base'][n])} -> {_fmt(section['final'][n])}" for n in section["base"]]
    return f"Task metrics, base model (round 0) -> final model (round {section['final_round']}): " + ", ".join(parts)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
