"""The near-duplicate index is exact: the same pairs as brute force, for every k."""

import numpy as np
import pytest

from filters.hamming import MAX_TABLE_BITS, band_layout, hamming_distance, near_pairs_unique
from tests.oracles import brute_force_neighbours


def _planted(rng, n, k):
    base = np.unique(rng.integers(0, 2**64 - 1, n, dtype=np.uint64))
    sources = rng.choice(len(base), len(base) // 5, replace=False)
    flips = np.zeros(len(sources), np.uint64)
    for _ in range(k):
        flips |= np.uint64(1) << rng.integers(0, 64, len(sources)).astype(np.uint64)
    # also chains: a neighbour of a neighbour
    chained = (base[sources] ^ flips) ^ (np.uint64(1) << rng.integers(0, 64, len(sources)).astype(np.uint64))
    return np.unique(np.concatenate([base, base[sources] ^ flips, chained]))


def _brute_pairs(values, k):
    d = np.bitwise_count(values[:, None] ^ values[None, :])
    i, j = np.nonzero(np.triu(d <= k, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 6, 9, 12])
@pytest.mark.parametrize("n", [50, 1500])
def test_same_pairs_as_brute_force(n, k):
    values = _planted(np.random.default_rng(n + k), n, k)
    i, j = near_pairs_unique(values, k)
    pairs = list(zip(i.tolist(), j.tolist(), strict=True))
    assert set(pairs) == _brute_pairs(values, k) and len(pairs) == len(set(pairs))  # each pair once
    assert pairs == sorted(pairs) and np.all(hamming_distance(values[i], values[j]) <= k)


def test_dense_clusters_of_near_identical_hashes():
    rng = np.random.default_rng(5)
    centre = np.uint64(0x0123_4567_89AB_CDEF)
    values = np.unique(centre ^ (np.uint64(1) << rng.integers(0, 64, 60).astype(np.uint64)))
    values = np.unique(np.concatenate([values, [centre]]))
    i, j = near_pairs_unique(values, 2)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == _brute_pairs(values, 2)


def test_every_layout_is_exact_by_pigeonhole_and_fits_its_tables():
    for n in [10, 1000, 10**6, 10**8]:
        for k in range(0, 32):
            layout = band_layout(n, k)
            assert sum(layout.widths) == 64 and max(layout.widths) <= MAX_TABLE_BITS
            assert (layout.radius + 1) * len(layout.widths) > k  # some band is within the radius
    big = band_layout(10**7, 8)  # the benchmark's hard case: 3 bands of 21-22 bits at radius 2
    assert big.widths == (22, 21, 21) and big.radius == 2
    with pytest.raises(ValueError):
        band_layout(100, 40)


def test_brute_force_helper():
    values = np.array([0, 1, 3, 2**63], dtype=np.uint64)
    assert brute_force_neighbours(values, 0, 1).tolist() == [1, 3]  # 2**63 is one bit from 0
    assert brute_force_neighbours(values, 2, 1).tolist() == [1]
