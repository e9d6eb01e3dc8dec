"""The flat vector SecAgg+ masks: sorted keys at the global rank, zero-padding, and per-entry coverage."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.model.lora import pad_rank, rank_slice
from fedtune.privacy.secagg import flat


def adapter(rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "m.v.lora_B.weight": rng.normal(size=(6, rank)).astype(np.float32),
        "m.q.lora_A.weight": rng.normal(size=(rank, 5)).astype(np.float32),
        "m.q.lora_B.weight": rng.normal(size=(7, rank)).astype(np.float32),
        "m.v.lora_A.weight": rng.normal(size=(rank, 5)).astype(np.float32),
    }


def test_flatten_orders_by_key_and_unflatten_inverts_it() -> None:
    # Prepare
    full = adapter(4)
    # Execute
    vector = flat.flatten(full, full)
    back = flat.unflatten(vector, full)
    # Assert
    expected = np.concatenate([full[k].ravel() for k in sorted(full)])
    np.testing.assert_array_equal(vector, expected)
    assert vector.size == flat.length(full) == sum(v.size for v in full.values())
    assert list(back) == sorted(full) and all(np.array_equal(back[k], full[k]) for k in full)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_a_lower_rank_delta_is_zero_padded_and_its_coverage_matches_pad_rank(rank: int) -> None:
    # Prepare: the site knows only its slice and the global rank
    full = adapter(4)
    site = rank_slice(adapter(4, seed=1), rank)
    like = flat.full_rank_like(site, 4)
    # Execute
    vector = flat.flatten(site, like)
    cover = flat.coverage(rank, full)
    # Assert
    assert {k: v.shape for k, v in like.items()} == {k: v.shape for k, v in full.items()}
    padded, masks = pad_rank(site, full)
    np.testing.assert_array_equal(vector, flat.flatten(padded, full))
    np.testing.assert_array_equal(cover, np.concatenate([masks[k].ravel() for k in sorted(full)]))
    assert cover.sum() == sum(v.size for v in site.values())
    np.testing.assert_array_equal(vector[cover == 0], 0)


def test_flatten_refuses_other_keys() -> None:
    full = adapter(2)
    with pytest.raises(ValueError, match="keys differ"):
        flat.flatten({k: v for k, v in full.items() if ".lora_A." not in k}, full)
