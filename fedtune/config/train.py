"""Config section ``train.*``: local training at each site."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedtune.config.fields import require


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """``train.*``: local training at each site."""

    local_steps: int = 3
    """Optimizer steps per round at each site."""
    batch_size: int = 4
    """Examples per micro-batch, for the whole site (split over ``train.num-processes``); an
    optimizer step takes ``train.grad-accum-steps`` micro-batches (DP-SGD: their total is the expected
    Poisson batch)."""
    lr: float = 2e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping of the batch gradient (not DP); 0 turns it off."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where a site trains; ``auto`` uses CUDA when present."""
    num_threads: int = 0
    """torch CPU threads per training process (a site, or each of its data-parallel ranks). 0 (auto):
    the cores this process may use (its CPU affinity) divided by the training processes fedtune runs
    at once on this machine (a simulation's concurrent clients, the ranks, the sites of a loopback
    demo federation); set it when other work shares the machine."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Autocast precision of the forward pass: ``bf16`` (CUDA or CPU), ``fp16`` (CUDA only, with a
    gradient scaler), ``fp32`` (none), or ``auto``: bf16 where the site's device computes it in
    hardware (a CUDA GPU from Ampere on, a CPU with AVX512-BF16 or AMX), else fp32; under DP-SGD always
    fp32. Adapter weights and optimizer state stay float32; evaluation runs in the model's dtype."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (less memory, more time)."""
    grad_accum_steps: int = 1
    """Micro-batches of ``train.batch-size`` per optimizer step: the effective batch is
    batch-size x grad-accum-steps, and the update equals one step on that batch. Under dp-sgd the
    expected Poisson batch is that effective batch, processed in this many chunks (virtual steps)."""
    num_processes: int = 1
    """Data-parallel processes at the site (one per GPU; gloo on CPU): each takes a disjoint shard of
    every micro-batch and gradients are all-reduced, so the update equals the 1-process one."""

    def __post_init__(self) -> None:
        require(self.local_steps >= 1, "train.local-steps", f"must be >= 1, got {self.local_steps}.")
        require(self.batch_size >= 1, "train.batch-size", f"must be >= 1, got {self.batch_size}.")
        require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}.")
        require(self.max_grad_norm >= 0, "train.max-grad-norm", "must be >= 0.")
        require(self.num_threads >= 0, "train.num-threads", "must be >= 0.")
        require(self.grad_accum_steps >= 1, "train.grad-accum-steps", f"must be >= 1, got {self.grad_accum_steps}.")
        require(self.num_processes >= 1, "train.num-processes", f"must be >= 1, got {self.num_processes}.")
        require(
            self.num_processes <= self.batch_size,
            "train.num-processes",
            f"({self.num_processes}) must be <= `train.batch-size` ({self.batch_size}): each process takes a "
            "shard of every micro-batch.",
        )
