"""SecAgg+ (Bell et al. 2020, https://eprint.iacr.org/2020/704): the pure-function core, no Flower code.

- ``quantize``: clipped floats <-> integers in Z_{2^b}; ``modulus_bits`` picks b <= 32.
- ``crypto``: X25519 key pairs, HKDF-derived pair keys, AES-GCM ``seal``/``open_``.
- ``shares``: Shamir shares of 32-byte secrets (pycryptodome), with a commitment check.
- ``masking``: ChaCha20 mask expansion, client ``mask``, server ``add``/``unmask``.
- ``graph``: the k-regular (or complete) masking graph, share holders, threshold rules.
- ``stages``: the four protocol stages as functions a ClientApp and a ServerApp call.
"""

from fedtune.privacy.secagg.errors import SecAggError, TooFewSurvivors
from fedtune.privacy.secagg.graph import check_params, default_threshold, neighbours, share_holders
from fedtune.privacy.secagg.quantize import Quantizer, modulus_bits, wire_dtype

__all__ = [
    "Quantizer",
    "SecAggError",
    "TooFewSurvivors",
    "check_params",
    "default_threshold",
    "modulus_bits",
    "neighbours",
    "share_holders",
    "wire_dtype",
]
