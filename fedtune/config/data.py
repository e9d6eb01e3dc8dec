"""Config section ``data.*``: where the records are, their format, partitioning and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedtune.config.fields import require


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """``data.*``: where the instruction data comes from and how it becomes token batches."""

    path: str = ""
    """JSONL/CSV/Parquet file or Hugging Face dataset name; empty means the built-in demo set."""
    eval_path: str = ""
    """Server-side held-out file for centralized eval; empty uses the demo test set with the demo
    data, and disables centralized eval otherwise."""
    description: str = ""
    """What the data is, in the operator's words (source, domain, size, licence); ``fedtune export``
    writes it into the model card. fedtune never derives it from the data."""
    format: Literal["alpaca", "chat"] = "chat"
    """Prompt format: Alpaca-style text, or the tokenizer's chat template."""
    instruction_field: str = "instruction"
    """Column holding the instruction."""
    input_field: str = "input"
    """Optional column holding extra input (may be absent)."""
    output_field: str = "output"
    """Column holding the response; the loss covers these tokens only."""
    partitioner: Literal["iid", "dirichlet", "natural"] = "natural"
    """How a simulation splits ``data.path`` across sites (flwr-datasets partitioners)."""
    partition_by: str = "site"
    """Column used by the ``natural`` and ``dirichlet`` partitioners."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet partitioner; smaller is more skewed."""
    eval_fraction: float = 0.2
    """Share of each site's rows kept back for federated evaluation."""
    max_seq_len: int = 128
    """Tokens per example after truncation."""
    truncation: Literal["prompt", "right"] = "prompt"
    """How an example longer than ``data.max-seq-len`` is cut. ``prompt``: keep the response whole
    and cut the prompt from the left (the question and the options nearest the answer stay); an
    example whose response alone exceeds the limit is dropped, and the data check says how many.
    Generation then keeps the last ``data.max-seq-len`` - ``eval.max-new-tokens`` prompt tokens
    (at least half of ``data.max-seq-len``).
    ``right``: cut prompt + response from the right (the response may lose its end, or all of it)."""
    max_eval_examples: int = 16
    """Cap on the examples any one evaluation uses."""
    label_field: str = ""
    """Column holding each record's label or choice (a class name, a letter), which the
    ``accuracy`` metric compares the generated answer with; empty: no labels."""
    on_bad_record: Literal["skip", "fail"] = "skip"
    """What a site does with malformed or empty records: ``skip`` drops them and says how many,
    ``fail`` refuses the data with the file, line and problem (never the content)."""

    def __post_init__(self) -> None:
        require(
            0 < self.eval_fraction < 1,
            "data.eval-fraction",
            f"must be in (0, 1), got {self.eval_fraction}.",
        )
        require(self.max_seq_len >= 8, "data.max-seq-len", f"must be >= 8, got {self.max_seq_len}.")
        require(
            self.dirichlet_alpha > 0,
            "data.dirichlet-alpha",
            f"must be > 0, got {self.dirichlet_alpha}.",
        )
        require(
            self.max_eval_examples >= 1,
            "data.max-eval-examples",
            f"must be >= 1, got {self.max_eval_examples}.",
        )
