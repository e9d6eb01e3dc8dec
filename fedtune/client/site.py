"""One data site's resident state: the base model with its adapter, and the site's tokenized data."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedtune.config import RunConfig
from fedtune.core.errors import ConfigError, DataError
from fedtune.data.checks import count_duplicates
from fedtune.data.loaders import load_checked, train_source
from fedtune.data.partition import site_partition, train_heldout
from fedtune.data.prompts import IGNORE, Example, check_format, tokenize_counted
from fedtune.model import threads
from fedtune.model.hardware import check_site, on_cuda, resolve_precision
from fedtune.model.loading import LoadedModel, pick_device
from fedtune.model.methods import load_for, wrap
from fedtune.wire import keys

log = logging.getLogger(__name__)

ANNOUNCED = "fedtune.site-announced"  # context.state: this site has logged its start-up report


@dataclass
class Site:
    """What a site keeps between rounds; the base model is shared by every site in the process."""

    name: str
    loaded: LoadedModel
    rank: int
    """This site's LoRA rank (``lora.r`` in its node config, or its ``simulation.site-ranks`` entry);
    0 for a ``peft.method`` other than lora."""
    train: list[Example]
    heldout: list[Example]
    heldout_records: list[dict[str, Any]] = field(default_factory=list)
    """The held-out records as read (prompts and references for the task metrics)."""
    data_checks: dict[str, int] = field(default_factory=dict)
    """The data checks' counts (``fedtune.data.checks``): never any content."""

    def model(self, cfg: RunConfig) -> Any:
        """The model with this site's method (adapter) active and the right parameters trainable."""
        return wrap(self.loaded, cfg, self.rank or None)


_SITES: dict[tuple[object, ...], Site] = {}


def _node_int(node_config: Mapping[str, Any], key: str) -> int:
    value = node_config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"node config `{key}` must be an integer, got {value!r}.")
    return value


def site_rank(cfg: RunConfig, node_config: Mapping[str, Any]) -> int:
    """The LoRA rank a site trains at: node config ``lora.r``, else ``simulation.site-ranks``
    (cycled by partition id), else ``lora.r``; never above the global adapter's rank; ``lora.r`` under
    lora-sb. 0 when the run's ``peft.method`` is not lora or lora-sb (a site's ``lora.r`` has nothing to set then)."""
    value = node_config.get("lora.r")
    if cfg.peft.method == "lora-sb":  # every site holds the server's factors, at the run's rank
        if value is not None and value != cfg.lora.r:
            raise ConfigError(
                f"node config `lora.r` = {value!r}: `peft.method` = lora-sb trains at `lora.r` = {cfg.lora.r}."
            )
        return cfg.lora.r
    if cfg.peft.method != "lora":
        if value is not None:
            log.warning("node config `lora.r` is ignored: this run's `peft.method` is %s.", cfg.peft.method)
        return 0
    if value is None and cfg.simulation.ranks() and keys.PARTITION_ID in node_config:
        ranks = cfg.simulation.ranks()
        value = ranks[_node_int(node_config, keys.PARTITION_ID) % len(ranks)]
    rank = cfg.lora.r if value is None else value
    if not isinstance(rank, int) or not 1 <= rank <= cfg.lora.r:
        raise ConfigError(
            f"node config `lora.r` must be an integer in 1..{cfg.lora.r} (the global rank), got {rank!r}."
        )
    return rank


def _set_threads(cfg: RunConfig) -> tuple[threads.Choice, int]:
    """This process's torch threads (``train.num-threads``, 0 = auto); the choice per training
    process and the number of CPU data-parallel ranks, for the site's start-up report."""
    ranks = 1 if on_cuda(cfg.train.device) else cfg.train.num_processes  # CPU ranks share the cores
    threads.apply(cfg.train.num_threads)  # this process: loading, evaluation; ranks set their own
    return threads.choose(cfg.train.num_threads, ranks), ranks


def _report(site: Site, lines: list[str], cfg: RunConfig) -> None:
    """The site's data checks and sizes, logged when it opens."""
    level = logging.WARNING if any(site.data_checks.values()) else logging.INFO
    log.log(level, "%s: %s", site.name, "\n".join(lines))
    lost = sum(1 for e in site.train + site.heldout if all(t == IGNORE for t in e.labels))
    if lost:
        log.warning(
            "%s: %d example(s) lose their whole response to `data.max-seq-len` = %d and teach nothing; raise it.",
            *(site.name, lost, cfg.data.max_seq_len),
        )
    method = f"LoRA rank {site.rank}" if site.rank else cfg.peft.method
    precision = (
        "fp32" if cfg.privacy.mechanism == "dp-sgd" else resolve_precision(cfg.train.precision, site.loaded.device)
    )
    where = f"{site.loaded.device}" + (f", {precision} autocast in training" if precision != "fp32" else "")
    log.info(
        "%s: %d train / %d held-out examples, %s, on %s",
        *(site.name, len(site.train), len(site.heldout), method, where),
    )


def open_site(cfg: RunConfig, node_config: Mapping[str, Any], state: RecordDict | None = None) -> Site:
    """Load (once per process) the base model and this site's data, and return the site.

    A site either points at its own file (node config ``data-path``) or, in a simulation, takes
    partition ``partition-id`` of ``data.path``. Its start-up report (threads, data checks, sizes)
    is logged once per site: ``state`` (the site's ``context.state``) remembers it across the
    processes that open the site (Ray workers, Flower's per-message ClientApp processes).
    """
    own_path = node_config.get(keys.DATA_PATH)
    if own_path:
        where: tuple[object, ...] = ("file", str(own_path))
    else:
        pid = _node_int(node_config, keys.PARTITION_ID)
        where = ("partition", pid, _node_int(node_config, keys.NUM_PARTITIONS))
    rank = site_rank(cfg, node_config)
    name = f"site {own_path}" if own_path else f"site {where[1]}"
    check_site(cfg, name)
    # what a round trains and sends (FFA, RoLoRA's phase, FedSA) is set on the model each round, not here
    lora = dataclasses.replace(cfg.lora, freeze_a=False, freeze_b=False, alternate=False, share="ab")
    key = (where, cfg.data, cfg.model, lora, cfg.peft, rank, cfg.train.device, cfg.seed)
    if key in _SITES:
        return _SITES[key]
    choice, ranks = _set_threads(cfg)
    loaded = load_for(cfg, pick_device(cfg.train.device))
    check_format(cfg.data, loaded.tokenizer, cfg.model.name)
    if where[0] == "file":
        rows, report = load_checked(str(own_path), cfg.data, key=f"node config {keys.DATA_PATH}")
    else:
        rows, report = load_checked(train_source(cfg.data), cfg.data)
        rows = site_partition(rows, cfg.data, int(where[1]), int(where[2]), cfg.seed)  # type: ignore[call-overload]
    train, held = train_heldout(rows, cfg.data, cfg.seed, name)
    held = held.select(range(min(len(held), cfg.data.max_eval_examples)))
    fit_train = tokenize_counted(train, cfg.data, loaded.tokenizer)
    fit_held = tokenize_counted(held, cfg.data, loaded.tokenizer)
    if not fit_train.examples:
        raise DataError(
            f"{name}: every training example's response alone is longer than `data.max-seq-len` = "
            f"{cfg.data.max_seq_len} tokens (all dropped under `data.truncation` = prompt); raise it."
        )
    site = Site(
        name=name,
        loaded=loaded,
        rank=rank,
        train=fit_train.examples,
        heldout=fit_held.examples,
        heldout_records=fit_held.records,
    )
    report.duplicates = count_duplicates(rows, cfg.data)  # this site's own records
    cut = fit_train.counts.merge(fit_held.counts)
    report.too_long, report.prompts_cut = cut.too_long, cut.prompts_cut
    report.responses_too_long = cut.responses_too_long
    site.data_checks = report.counts()
    if state is None or ANNOUNCED not in state:
        threads.log_choice(name, choice, ranks)
        _report(site, report.lines(cfg.data.max_seq_len, cfg.data.truncation), cfg)
        if state is not None:
            state[ANNOUNCED] = ConfigRecord({"site": name})
    _SITES[key] = site
    return site
