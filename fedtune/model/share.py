"""Which part of a LoRA adapter leaves a site and which stays: FFA-LoRA, RoLoRA and FedSA-LoRA key sets.

FFA-LoRA (``lora.freeze-a``) trains and sends only B; FedSA-LoRA (``lora.share = a``, Guo et al.,
ICLR 2025, https://arxiv.org/abs/2410.01463) trains both but sends only A, each site keeping its own B;
LoRA-SB (``peft.method = lora-sb``) trains and sends only its r x r cores.
"""

from __future__ import annotations

from fedtune.config import LoraSection
from fedtune.core.arrays import Arrays
from fedtune.model.lora import LORA_A, LORA_B
from fedtune.model.sb import core_keys, is_sb


def sent_keys(arrays: Arrays, lora: LoraSection) -> list[str]:
    """Keys a site sends: all of them; only B (and non-LoRA) under FFA-LoRA (``lora.freeze-a``) and the
    B rounds of ``lora.alternate``; only A (and non-LoRA) under ``lora.freeze-b`` (the A rounds of
    ``lora.alternate``) and ``lora.share = a``."""
    if is_sb(arrays):  # LoRA-SB: only the cores; the server fixed A and B
        return core_keys(arrays)
    frozen = [k for k in arrays if (lora.freeze_a and LORA_A in k) or (lora.freeze_b and LORA_B in k)]
    return [k for k in arrays if k not in frozen and k not in kept_keys(arrays, lora)]


def kept_keys(arrays: Arrays, lora: LoraSection) -> list[str]:
    """Keys a site keeps for itself across rounds and never sends: the B matrices under ``lora.share = a``."""
    return [k for k in arrays if lora.share == "a" and LORA_B in k]


def personal(global_arrays: Arrays, own: Arrays) -> Arrays:
    """A site's personal adapter: the global adapter with the site's own kept entries in place."""
    return {**global_arrays, **{k: v for k, v in own.items() if k in global_arrays}}
