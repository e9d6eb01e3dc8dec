"""One round's record: what ``metrics.jsonl``, the table, the plots, ``sites.json``, ``summary.json`` and the
checkpoints' history hold of a round, as typed fields.

:meth:`RoundRecord.to_json` gives the JSON object ``metrics.jsonl`` has always carried (the same field
names, absent fields left out), and :meth:`RoundRecord.from_json` reads one back, e.g. from a checkpoint's
history, including one written before this class existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fedtune.config.evaluation import KNOWN, column

Json = dict[str, Any]
PARTS = ("_central", "_federated", "")
"""The three columns of each evaluation metric: ``<m>_central``, ``<m>_federated``, ``<m>``."""


def json_number(value: float | None) -> float | str | None:
    """``value`` for JSON: infinity as the string "inf" (JSON has no infinity)."""
    return "inf" if value is not None and math.isinf(value) else value


def _number(value: Any) -> float | None:
    """A JSON number back: "inf" as infinity."""
    return math.inf if value == "inf" else value


def _present(obj: Any) -> Json:
    """A dataclass's fields that are set (not None), in field order."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}


@dataclass
class Failure:
    """A node that failed the round (or its evaluation), and why."""

    node: int | None
    """None once redacted (the sample is secret)."""
    reason: str

    def to_json(self) -> Json:
        return {"reason": self.reason} if self.node is None else {"node": self.node, "reason": self.reason}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Failure:
        return cls(data.get("node"), str(data.get("reason", "")))


@dataclass
class NodeBytes:
    """Bytes one node's messages moved in the round."""

    up: int = 0
    down: int = 0


@dataclass(frozen=True)
class Score:
    """One evaluation metric of the round: the server's value on its held-out set and the federation's
    (example-weighted over the sites' held-out splits); either may be missing."""

    central: float | None = None
    federated: float | None = None

    @property
    def value(self) -> float | None:
        """The metric's own column: the central value when there is one, else the federated one."""
        return self.central if self.central is not None else self.federated


@dataclass(frozen=True)
class DistributedInfo:
    """What a distributed-DP round released: sensitivities, the noise target and the noise really present."""

    scale: float
    l1: float
    l2: float
    min_survivors: int
    mu_share: float
    mu_target: float
    mu_released: float
    noise_std_of_mean: float


@dataclass
class SecAggInfo:
    """A SecAgg+ round's ``secagg`` object: its parameters, survivors and per-stage tallies; unset fields
    (a round abandoned early, or redacted ids) are left out of the JSON."""

    stages: dict[str, dict[str, Any]] | None = None
    """Per stage (keys, shares, masked, unmask): seconds, clients asked and answering, bytes both ways."""
    degree: int | None = None
    threshold: int | None = None
    quant_bits: int | None = None
    modulus_bits: int | None = None
    clip: float | None = None
    survivors: int | None = None
    recovered: list[int] | None = None
    """Dropped after sharing, masks removed."""
    distributed: DistributedInfo | None = None
    abandoned: str | None = None
    """Why the round was abandoned, if it was."""
    dropped: list[int] | None = None
    """Sampled but not in the sum."""

    def to_json(self) -> Json:
        out = _present(self)
        if self.distributed is not None:
            out["distributed"] = _present(self.distributed)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecAggInfo:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if "distributed" in values:
            values["distributed"] = DistributedInfo(**values["distributed"])
        return cls(**values)


@dataclass
class Contribution:
    """``server.mode = async``: one reply aggregated into a version, and its staleness (versions published
    since the site started from the global it was sent)."""

    node: int
    staleness: int

    def to_json(self) -> Json:
        return {"node": self.node, "staleness": self.staleness}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Contribution:
        return cls(int(data["node"]), int(data["staleness"]))


@dataclass
class RoundRecord:
    """Everything one round records (``metrics.jsonl``'s object for the round), in the order it is written."""

    round: int
    sampled: int = 0
    sampled_nodes: list[int] | None = None
    spec: dict[str, Any] | None = None
    """The round's strategy and plan changes (``Plan.spec``)."""
    time: dict[str, float] = field(default_factory=dict)
    """Where the round's seconds went (``timing.RoundClock``, plus ``eval``)."""
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_per_client: dict[int, NodeBytes] | None = None
    replied: int = 0
    failed: int = 0
    failures: list[Failure] | None = None
    replied_nodes: list[int] | None = None
    budget_exhausted_nodes: list[int] | None = None
    data_checks: dict[int, dict[str, int]] | None = None
    """Each node's data-check counts (malformed, empty, duplicates, too_long)."""
    version: int | None = None
    """``server.mode = async``: the global version this row publishes (``round`` counts versions)."""
    contributors: list[Contribution] | None = None
    """``server.mode = async``: each aggregated reply (a site may send two) with its staleness."""
    idle_seconds: dict[int, float] | None = None
    """Seconds each site spent with no work: ``server.mode = async``, each connected site during this version;
    ``sync``, each site that replied, from its reply until the round's slowest reply (or the timeout); none
    under a DP mechanism (a site's seconds follow its data) or a hidden sample."""
    train_loss: float | None = None
    clip_norm: float | None = None
    clip_norm_next: float | None = None
    unclipped_share_noised: float | None = None
    aggregator: dict[str, float] = field(default_factory=dict)
    """The aggregation rule's own figures (``Aggregator.metrics``, e.g. ``krum_selected``), each a field."""
    updated: bool | None = None
    """Whether the round changed the global adapter."""
    secagg: SecAggInfo | None = None
    eval_failures: list[Failure] | None = None
    sites_eval: dict[int, dict[str, float]] | None = None
    """Each site's held-out loss and task metrics, with its example counts."""
    scores: dict[str, Score] = field(default_factory=dict)
    """Each ``eval.metrics`` name's values, written as ``<m>_central``, ``<m>_federated``, ``<m>``."""
    seconds: float | None = None
    epsilon: float | None = None
    """Epsilon so far in the run's DP unit (inf: no finite guarantee; None: no DP)."""
    unknown: dict[str, Any] = field(default_factory=dict)
    """Fields of an older record this version does not know, written back as they were read."""

    def count_bytes(self, node: int, *, up: int = 0, down: int = 0) -> None:
        """Count a message's bytes in the round's totals and in ``bytes_per_client``."""
        self.bytes_up += up
        self.bytes_down += down
        if self.bytes_per_client is None:
            self.bytes_per_client = {}
        mine = self.bytes_per_client.setdefault(node, NodeBytes())
        mine.up += up
        mine.down += down

    def clipping(
        self, clip_norm: float, clip_norm_next: float | None = None, unclipped_share_noised: float | None = None
    ) -> None:
        """Central DP's clip norm for the round; under adaptive clipping also the next one and the noised share
        of replies that fitted under it (the fields ``privacy.mechanisms.central.adapt_clip`` returns)."""
        self.clip_norm = clip_norm
        self.clip_norm_next = clip_norm_next
        self.unclipped_share_noised = unclipped_share_noised

    def aggregated(self, metrics: Mapping[str, float]) -> None:
        """The round aggregator's own figures: central DP's clip norms go to their fields, the rest (a
        reconstruction error, Krum's selection) to ``aggregator``."""
        figures = dict(metrics)
        if "clip_norm" in figures:
            self.clipping(
                figures.pop("clip_norm"),
                figures.pop("clip_norm_next", None),
                figures.pop("unclipped_share_noised", None),
            )
        self.aggregator.update(figures)

    def score(self, name: str) -> float | None:
        """Metric ``name``'s value this round (its own column), or None."""
        found = self.scores.get(name)
        return found.value if found is not None else None

    def to_json(self) -> Json:
        """The round's ``metrics.jsonl`` object: fields in declaration order, unset optional ones left out."""
        out: Json = {"round": self.round, "sampled": self.sampled}
        _put(out, "sampled_nodes", self.sampled_nodes)
        _put(out, "spec", self.spec)
        out.update(time=dict(self.time), bytes_up=self.bytes_up, bytes_down=self.bytes_down)
        if self.bytes_per_client is not None:
            out["bytes_per_client"] = {str(n): {"up": b.up, "down": b.down} for n, b in self.bytes_per_client.items()}
        out.update(replied=self.replied, failed=self.failed)
        _put(out, "failures", _failures(self.failures))
        _put(out, "replied_nodes", self.replied_nodes)
        _put(out, "budget_exhausted_nodes", self.budget_exhausted_nodes)
        _put(out, "data_checks", _by_str(self.data_checks))
        _put(out, "version", self.version)
        if self.contributors is not None:
            out["contributors"] = [c.to_json() for c in self.contributors]
        if self.idle_seconds is not None:
            out["idle_seconds"] = {str(n): s for n, s in self.idle_seconds.items()}
        out["train_loss"] = self.train_loss
        _put(out, "clip_norm", self.clip_norm)
        _put(out, "clip_norm_next", self.clip_norm_next)
        _put(out, "unclipped_share_noised", self.unclipped_share_noised)
        out.update(self.aggregator)
        _put(out, "updated", self.updated)
        _put(out, "secagg", self.secagg.to_json() if self.secagg is not None else None)
        _put(out, "eval_failures", _failures(self.eval_failures))
        _put(out, "sites_eval", _by_str(self.sites_eval))
        for name, score in self.scores.items():
            col = column(name)
            out.update({f"{col}_central": score.central, f"{col}_federated": score.federated, col: score.value})
        _put(out, "seconds", self.seconds)
        out["epsilon"] = json_number(self.epsilon)
        out.update(self.unknown)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        """A record from its ``metrics.jsonl`` object or a checkpoint's history entry (fields it lacks keep
        their defaults)."""
        rest = dict(data)
        record = cls(round=int(rest.pop("round")), scores=_take_scores(rest))
        for f in fields(cls):
            if f.name in rest and f.name not in ("aggregator", "scores", "unknown"):
                setattr(record, f.name, _READERS.get(f.name, _same)(rest.pop(f.name)))
        for key, value in rest.items():  # a number this version does not name is an aggregation rule's figure
            number = isinstance(value, int | float) and not isinstance(value, bool)
            (record.aggregator if number else record.unknown)[key] = value
        return record


def _put(out: Json, key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


def _failures(failures: list[Failure] | None) -> list[Json] | None:
    return None if failures is None else [f.to_json() for f in failures]


def _by_str(by_node: Mapping[int, Mapping[str, Any]] | None) -> dict[str, Json] | None:
    return None if by_node is None else {str(n): dict(v) for n, v in by_node.items()}


def _by_node(by_str: Mapping[str, Any]) -> dict[int, Any]:
    return {int(n): dict(v) for n, v in by_str.items()}


def _same(value: Any) -> Any:
    return value


def _take_scores(data: dict[str, Any]) -> dict[str, Score]:
    """Pop each metric's three columns out of ``data``, in the order they appear (a metric without all
    three stays in ``data``)."""
    names = {column(m) + part: m for m in KNOWN for part in PARTS}
    scores: dict[str, Score] = {}
    for key in list(data):
        name = names.get(key)
        cols = [column(name) + part for part in PARTS] if name is not None else []
        if name is not None and name not in scores and all(c in data for c in cols):
            scores[name] = Score(data.pop(cols[0]), data.pop(cols[1]))
            data.pop(cols[2])
    return scores


def _failure_list(values: list[Mapping[str, Any]]) -> list[Failure]:
    return [Failure.from_json(v) for v in values]


_READERS: dict[str, Callable[[Any], Any]] = {
    "time": dict,
    "bytes_per_client": lambda v: {int(n): NodeBytes(int(b["up"]), int(b["down"])) for n, b in v.items()},
    "failures": _failure_list,
    "data_checks": _by_node,
    "secagg": SecAggInfo.from_json,
    "contributors": lambda v: [Contribution.from_json(c) for c in v],
    "idle_seconds": lambda v: {int(n): float(s) for n, s in v.items()},
    "eval_failures": _failure_list,
    "sites_eval": _by_node,
    "epsilon": _number,
}
"""How a JSON value becomes the field's value, where it is not the same."""
