"""LoRA-SB (``peft.method = lora-sb``; Fed-SB, Singhal et al. 2025, https://arxiv.org/abs/2502.15436):
PEFT's LoRA at rank r with A and B frozen and a trainable r x r core R between them,
delta W = (alpha / r) B R A.

Built on PEFT's own LoRA layers: each target's ``lora_A`` becomes a :class:`CoredLinear`, a linear map
holding A that then applies the layer's core (``lora_sb_core``, a plain bias-free ``nn.Linear`` of
r x r, so Opacus computes its per-example gradients like any linear layer's); A and B are buffers, so
nothing but the cores can train. The core's PEFT state-dict key is ``<module>.lora_sb_core.weight``,
which PEFT's own save/load maps like any LoRA key, so the adapter travels, checkpoints and loads back
as named arrays with the other methods. Folding the core into B
(B' = B R) gives a vanilla PEFT LoRA adapter with the same delta W (:func:`fold`).

The frozen factors (the *frame*) are fixed once, by the server, and travel to each site once: every
message names their :func:`fingerprint`, and only a site that does not yet hold that frame receives it
beside the cores (``server/frame.py``, ``client/frame.py``). They are fixed by

- ``svd`` (default, data-free, as LoRA-XS, Bałazy et al. 2024): W = U S V^T truncated to rank r,
  B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T, so B A is the best rank-r approximation of W;
- ``gradient`` (as LoRA-SB): the truncated SVD of the base model's gradient G of each target weight,
  accumulated over a calibration file: B = U_r, A = V_r^T.

R starts at zero, so the initial delta W is zero and round 1 starts from the base model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from fedtune.core.arrays import Arrays
from fedtune.core.errors import ModelError
from fedtune.model.lora import LORA_B

CORE = ".lora_sb_core."
"""What marks a core's key (``<module>.lora_sb_core.weight``) among an adapter's arrays."""


class Fixed(nn.Module):
    """A bias-free linear map whose weight is a buffer: PEFT's adapter switches (``set_adapter``,
    ``disable_adapter``) make every adapter *parameter* trainable again, never a buffer."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.weight: torch.Tensor
        self.register_buffer("weight", weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class CoredLinear(Fixed):
    """LoRA's A (r, in), fixed, followed by its layer's trainable r x r core: x -> R (A x). The core is
    registered on the LoRA layer (``lora_sb_core``), not here, so that its key is PEFT-shaped."""

    def __init__(self, weight: torch.Tensor, core: nn.Linear) -> None:
        super().__init__(weight)
        object.__setattr__(self, "sb_core", core)  # not a submodule: its parameter is the layer's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        core: nn.Linear = self.__dict__["sb_core"]
        return core(super().forward(x))  # type: ignore[no-any-return]


def _layers(model: PeftModel) -> Iterable[tuple[str, Any]]:
    name = model.active_adapter
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            yield path, module


def install_cores(model: PeftModel) -> None:
    """Give the active adapter's LoRA layers their cores (once, zero) and fix their A and B, so that
    only the cores train."""
    name = model.active_adapter
    for _, layer in _layers(model):
        a = layer.lora_A[name]
        if isinstance(a, CoredLinear):
            continue
        if not hasattr(layer, "lora_sb_core"):
            layer.lora_sb_core = nn.ModuleDict()
            layer.adapter_layer_names = (*layer.adapter_layer_names, "lora_sb_core")
        weight = a.weight
        core = nn.Linear(a.out_features, a.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(core.weight)
        layer.lora_sb_core[name] = core
        layer.lora_A[name] = CoredLinear(weight, core)
        layer.lora_B[name] = Fixed(layer.lora_B[name].weight)


def is_sb(arrays: Arrays) -> bool:
    """Whether an adapter's arrays are LoRA-SB's (they hold cores)."""
    return any(CORE in k for k in arrays)


def core_keys(arrays: Arrays) -> list[str]:
    """The cores: all a LoRA-SB site trains and sends."""
    return [k for k in arrays if CORE in k]


def frame_of(arrays: Arrays) -> Arrays:
    """The frame: every entry of a LoRA-SB adapter that is not a core (the fixed A and B)."""
    return {k: v for k, v in arrays.items() if CORE not in k}


def fingerprint(frame: Arrays) -> str:
    """SHA-256 (hex) of a frame: each entry's key, shape and float32 little-endian bytes, in key order.
    Two frames with the same fingerprint are the same arrays, bit for bit."""
    digest = hashlib.sha256()
    for key in sorted(frame):
        value = np.ascontiguousarray(frame[key], "<f4")
        digest.update(f"{key}:{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def fold(arrays: Arrays) -> Arrays:
    """The vanilla PEFT LoRA adapter with the same delta W: each core folded into its B (B' = B R)."""
    out = {k: v for k, v in arrays.items() if CORE not in k}
    for key in core_keys(arrays):
        b_key = key.replace(CORE, LORA_B)  # <module>.lora_B.weight
        out[b_key] = (np.asarray(arrays[b_key], np.float64) @ np.asarray(arrays[key], np.float64)).astype(np.float32)
    return out


def _set_factors(layer: Any, name: str, b: torch.Tensor, a: torch.Tensor) -> None:
    with torch.no_grad():
        layer.lora_B[name].weight.copy_(b.to(layer.lora_B[name].weight))
        layer.lora_A[name].weight.copy_(a.to(layer.lora_A[name].weight))
        layer.lora_sb_core[name].weight.zero_()


def _base_weight(path: str, layer: Any) -> torch.Tensor:
    weight: torch.Tensor = layer.get_base_layer().weight
    name = layer.active_adapters[0]
    if tuple(weight.shape) != (layer.lora_B[name].out_features, layer.lora_A[name].in_features):
        raise ModelError(
            f"`peft.method` = lora-sb: {path} is not a plain linear layer; choose other `lora.target-modules`."
        )
    return weight


def _truncated(matrix: torch.Tensor, r: int, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix.detach().to("cpu", torch.float32), full_matrices=False)
    if s.shape[0] < r:
        raise ModelError(f"`lora.r` = {r} is above the rank of {path}'s weight ({s.shape[0]}); lower `lora.r`.")
    return u[:, :r], s[:r], vh[:r]


def init_svd(model: PeftModel) -> None:
    """Fix every factor from its base weight: B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T; cores zero."""
    name = model.active_adapter
    for path, layer in _layers(model):
        r = layer.r[name]
        u, s, vh = _truncated(_base_weight(path, layer), r, path)
        root = s.sqrt()
        _set_factors(layer, name, u * root, root[:, None] * vh)


def init_gradient(model: PeftModel, batches: Iterable[dict[str, torch.Tensor]], loss: Callable[..., Any]) -> None:
    """Fix every factor from the base model's gradient G of its target weight, summed over ``batches``
    (``loss(model, batch)`` a scalar): B = U_r, A = V_r^T of G's truncated SVD; cores zero."""
    name = model.active_adapter
    layers = list(_layers(model))
    weights = [_base_weight(path, layer) for path, layer in layers]
    for weight in weights:
        weight.requires_grad_(True)
        weight.grad = None
    try:
        with model.disable_adapter():
            for batch in batches:
                loss(model, batch).backward()
        grads = [w.grad for w in weights]
    finally:
        for weight in weights:
            weight.requires_grad_(False)
            weight.grad = None
    for (path, layer), grad in zip(layers, grads, strict=True):
        if grad is None or not torch.isfinite(grad).all() or not grad.any():
            raise ModelError(f"`peft.sb-init-data`: the base model's gradient of {path} is zero or not finite.")
        u, _, vh = _truncated(grad, layer.r[name], path)
        _set_factors(layer, name, u, vh)
    model.zero_grad(set_to_none=True)
