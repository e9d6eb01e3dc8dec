"""Config section ``eval.*``: what is evaluated where, and the metric names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedtune.config.fields import require

LOSS = "loss"
EXACT_MATCH = "exact-match"
F1 = "f1"
ROUGE_L = "rouge-l"
ACCURACY = "accuracy"
KNOWN = (LOSS, EXACT_MATCH, F1, ROUGE_L, ACCURACY)
"""Every name ``eval.metrics`` accepts; all but ``loss`` need generated answers."""
GENERATED = (EXACT_MATCH, F1, ROUGE_L, ACCURACY)


def parse_names(text: str) -> list[str]:
    """``"loss, rouge-l"`` -> ``["loss", "rouge-l"]`` (order kept, duplicates dropped)."""
    out: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if name and name not in out:
            out.append(name)
    return out


def column(name: str) -> str:
    """The key a metric has in ``metrics.jsonl`` and ``sites.json``: ``rouge-l`` -> ``rouge_l``
    (``loss`` -> ``eval_loss``, as before task metrics existed)."""
    return "eval_loss" if name == LOSS else name.replace("-", "_")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """``eval.*``: evaluation."""

    federated: bool | Literal["auto"] = "auto"
    """Evaluate the global adapter on each site's held-out split every round. ``auto``: on without DP,
    off under a DP mechanism (whose guarantee does not cover the per-site metrics it reports);
    ``true`` turns it on under DP too, and the run's trust statement then says they are not covered."""

    def federated_on(self, dp: bool) -> bool:
        """``eval.federated``'s effective value in a run with (``dp``) or without a DP mechanism."""
        return (not dp) if self.federated == "auto" else bool(self.federated)

    federated_every: int = 1
    """Rounds between federated evaluations, when ``eval.federated`` is on. ``1``: every round,
    round 0 (the base model) included; ``N``: round 0, every Nth round and the last round; ``0``: the
    last round only (the sites' view of the final model; the rounds before evaluate on the server's
    held-out set alone, as Flower's round 0 does)."""

    def federates_in(self, rnd: int, last: int) -> bool:
        """Whether round ``rnd`` of a run of ``last`` rounds evaluates at the sites (``eval.federated-every``;
        ``eval.federated`` itself decides whether any round does)."""
        every = self.federated_every
        return rnd == last or (every > 0 and rnd % every == 0)

    centralized: bool = True
    """Evaluate the global adapter on the server's held-out set every round."""
    batch_size: int = 8
    """Examples per evaluation batch."""
    max_new_tokens: int = 48
    """Tokens generated per answer (task metrics and the base-vs-fine-tuned sample answer)."""
    metrics: str = "loss"
    """Comma-separated metrics each evaluation computes: ``loss`` (held-out loss per response
    token), and on generated answers ``exact-match``, ``f1``, ``rouge-l``, ``accuracy`` (needs
    ``data.label-field``). Generation is slow: see ``eval.max-generate``."""
    max_generate: int = 8
    """Held-out examples each evaluation (each site's, and the server's) generates answers for."""
    task_metrics_every: int = 1
    """Rounds between evaluations that generate answers for the task metrics in ``eval.metrics``
    (``exact-match``, ``f1``, ``rouge-l``, ``accuracy``); the rounds in between evaluate only the
    loss. Round 0 (the base model) and the last round always generate. ``1``: every round; ``0``:
    only round 0 and the last round, however many rounds the run has."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "eval.batch-size", "must be >= 1.")
        require(self.max_new_tokens >= 1, "eval.max-new-tokens", "must be >= 1.")
        require(self.max_generate >= 1, "eval.max-generate", f"must be >= 1, got {self.max_generate}.")
        require(
            self.federated_every >= 0,
            "eval.federated-every",
            f"must be >= 0 (0: only the last round), got {self.federated_every}.",
        )
        require(
            self.task_metrics_every >= 0,
            "eval.task-metrics-every",
            f"must be >= 0 (0: only round 0 and the last round), got {self.task_metrics_every}.",
        )
        unknown = [n for n in parse_names(self.metrics) if n not in KNOWN]
        require(
            not unknown,
            "eval.metrics",
            f"has unknown metric(s) {', '.join(map(repr, unknown))}; known: {', '.join(KNOWN)}.",
        )

    def metric_names(self) -> list[str]:
        """The names in ``eval.metrics``, in order."""
        return parse_names(self.metrics)

    def generates_in(self, rnd: int, last: int) -> bool:
        """Whether round ``rnd`` of a run of ``last`` rounds computes the generated task metrics
        (``eval.task-metrics-every``; round 0 and the last round always do)."""
        every = self.task_metrics_every
        return rnd in (0, last) or (every > 0 and rnd % every == 0)

    def without_generation(self) -> str:
        """``eval.metrics`` less the generated metrics (``loss`` if nothing else is left)."""
        return ",".join([n for n in self.metric_names() if n not in GENERATED] or [LOSS])
