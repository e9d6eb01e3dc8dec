"""The flat vector SecAgg+ masks: sorted keys at the global rank, zero-padding, and per-entry coverage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedtune.model.lora import full_rank_like, pad_rank, rank_slice
from fedtune.privacy.secagg import flat
from fedtune.privacy.secagg.errors import SecAggError
from fedtune.server.secagg_stages import covered


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
    like = full_rank_like(site, 4)
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


@pytest.mark.parametrize(
    ("ranks", "want"),
    [
        ([4, 2, 2], [(1, 2, 3), (3, 4, 1)]),
        ([4, 4, 2], [(1, 2, 3), (3, 4, 2)]),
        ([1, 4, 2, 4], [(1, 1, 4), (2, 2, 3), (3, 4, 2)]),
        ([3, 3], [(1, 3, 2)]),
        ([0, 0], []),
    ],
)
def test_rank_bands_are_the_entries_each_number_of_sites_trains(
    ranks: list[int], want: list[tuple[int, int, int]]
) -> None:
    # Prepare: how many sites train each flat entry, from the coverage masks (numpy reference)
    full = adapter(4)
    per_component = sum(v.shape[0] if ".lora_B." in k else v.shape[1] for k, v in full.items())  # out + in
    counts = sum((flat.coverage(r, full) for r in ranks if r), np.zeros(flat.length(full)))
    # Execute
    found = flat.bands(ranks)
    # Assert: the listed bands, and each band's entries are exactly those that its number of sites trains
    assert found == want
    values, sizes = np.unique(counts[counts > 0], return_counts=True)
    assert dict(zip(values.astype(int).tolist(), sizes.tolist(), strict=True)) == {
        c: (b - a + 1) * per_component for a, b, c in found
    }


def test_an_entry_one_site_trains_is_that_site_s_delta_in_the_sum() -> None:
    # Prepare: ranks 4/2/2, the finding's example; the server divides the padded sum by the coverage
    full = adapter(4)
    deltas = [rank_slice(adapter(4, seed=s), r) for s, r in ((1, 4), (2, 2), (3, 2))]
    total = sum(flat.flatten(d, full) for d in deltas)
    counts = sum(flat.coverage(r, full) for r in (4, 2, 2))
    # Execute
    (_, (first, last, sites)) = flat.bands([4, 2, 2])
    # Assert: band 3..4 has one site, and there the sum is site A's delta (why the band needs t sites)
    assert (first, last, sites) == (3, 4, 1)
    alone = counts == 1
    assert alone.sum() == flat.length(full) // 2
    np.testing.assert_array_equal(total[alone], flat.flatten(deltas[0], full)[alone])


def test_the_server_refuses_exactly_the_rank_sets_where_some_entry_has_1_to_t_minus_1_sites() -> None:
    # Prepare: every multiset of ranks 1..4 over 1..5 survivors, every threshold 1..5
    full = adapter(4)
    for n in range(1, 6):
        for ranks in itertools.combinations_with_replacement(range(1, 5), n):
            counts = sum((flat.coverage(r, full) for r in ranks), np.zeros(flat.length(full)))
            for t in range(1, 6):
                # Reference: an entry that 1..t-1 sites train shows fewer than t sites' update
                exposed = bool(np.any((counts > 0) & (counts < t)))
                # Execute / Assert
                if exposed:
                    with pytest.raises(SecAggError, match=rf"fewer than the threshold {t}; the sum would show"):
                        covered(dict(enumerate(ranks)), t, "before unmasking")
                else:
                    covered(dict(enumerate(ranks)), t, "before unmasking")


def test_the_server_names_the_band_and_its_nodes() -> None:
    with pytest.raises(
        SecAggError, match=r"^before unmasking: LoRA components 3\.\.4 trained by only 1 site\(s\) \(node 7\)"
    ):
        covered({7: 4, 8: 2, 9: 2}, 2, "before unmasking")
