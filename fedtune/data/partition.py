"""Split a dataset across simulated sites with flwr-datasets partitioners, then train/held-out."""

from __future__ import annotations

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

from fedtune.config import DataConfig
from fedtune.core.errors import ConfigError, DataError


def make_partitioner(cfg: DataConfig, num_partitions: int, seed: int, columns: list[str]) -> Partitioner:
    """The flwr-datasets partitioner that ``data.partitioner`` names."""
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.partition_by not in columns:
        raise ConfigError(
            f"`data.partition-by`: column {cfg.partition_by!r} is not in the data (columns: {', '.join(columns)})."
        )
    if cfg.partitioner == "natural":
        return NaturalIdPartitioner(partition_by=cfg.partition_by)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=cfg.partition_by,
        alpha=cfg.dirichlet_alpha,
        seed=seed,
        min_partition_size=2,
    )


def site_partition(ds: Dataset, cfg: DataConfig, partition_id: int, num_partitions: int, seed: int) -> Dataset:
    """Rows of site ``partition_id`` out of ``num_partitions``."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"node config `partition-id` {partition_id} is outside 0..{num_partitions - 1}.")
    partitioner = make_partitioner(cfg, num_partitions, seed, ds.column_names)
    partitioner.dataset = ds
    if cfg.partitioner == "natural":
        found = partitioner.num_partitions
        if found != num_partitions:
            raise ConfigError(
                f"`data.partitioner` = natural gives one site per distinct `{cfg.partition_by}` value "
                f"({found}), but the federation has {num_partitions} sites "
                f"(simulated: set `simulation.num-supernodes` / --clients to {found}; deployed: `--share K/{found}`, "
                "or `data.partitioner = iid` on the server for any number of shares)."
            )
    try:
        part = partitioner.load_partition(partition_id)
    except ValueError as exc:
        raise DataError(f"`data.partitioner`: cannot build partition {partition_id}: {exc}") from None
    return part


def train_heldout(ds: Dataset, cfg: DataConfig, seed: int, site: str) -> tuple[Dataset, Dataset]:
    """Split one site's rows into train and held-out; an empty side is an error naming the site."""
    if len(ds) < 2:
        raise DataError(f"{site}: partition holds {len(ds)} record(s); each site needs at least 2.")
    split = ds.train_test_split(test_size=cfg.eval_fraction, seed=seed)
    return split["train"], split["test"]
