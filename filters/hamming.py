"""Exact near-duplicate search over 64-bit hashes: all pairs within Hamming distance k.

Multi-index hashing (Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing"):
split the 64 bits into m bands. If two hashes differ in at most k bits, some band differs in at
most r = k // m bits (pigeonhole). Each band is indexed by a counting sort, a bucket per band
value (a direct-address table: no hashing, no comparisons); every hash then probes the buckets of
all band values within r bits of its own. Every candidate is checked on all 64 bits, so the result
is exact: no pair within k is missed and none beyond k is returned. A pair is reported once: from
the first band where it is within r, and from the hash with the smaller value in that band (so
half the probes are skipped outright).

The layout (m, hence band width and r) minimises a cost model: probes (hashes x bands x band
values within r), candidate checks (probes x hashes per bucket) and the tables themselves. For
10M hashes and k = 8 that is 3 bands of 21-22 bits searched at r = 2. The probe loop is compiled
with numba and runs on every core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numba
import numpy as np

BITS = 64
MAX_TABLE_BITS = 26  # a band's bucket table has 2^width entries: 26 bits is 512 MiB of offsets at most
# rough relative costs, not fitted: a probe reads the offset table out of cache, a check reads one hash in order
_PROBE_COST, _CHECK_COST, _TABLE_COST = 4.0, 1.0, 1.0


@dataclass(frozen=True)
class BandLayout:
    shifts: tuple[int, ...]
    widths: tuple[int, ...]
    radius: int  # per-band Hamming radius searched: k // len(widths)

    def cost(self, n: int) -> float:
        probes = n * sum(_ball(w, self.radius) for w in self.widths)
        checks = sum(n * _ball(w, self.radius) * n / 2**w for w in self.widths)
        return probes * _PROBE_COST + checks * _CHECK_COST + sum(2**w for w in self.widths) * _TABLE_COST


def _ball(width: int, radius: int) -> int:
    """How many band values lie within `radius` bits of one band value."""
    return sum(math.comb(width, d) for d in range(min(radius, width) + 1))


def _split(m: int, max_distance: int) -> BandLayout:
    base, extra = divmod(BITS, m)
    widths = tuple(base + (1 if i < extra else 0) for i in range(m))
    shifts = tuple(int(sum(widths[:i])) for i in range(m))
    return BandLayout(shifts, widths, max_distance // m)


def band_layout(n: int, max_distance: int) -> BandLayout:
    """The cheapest split into bands of at most MAX_TABLE_BITS bits for `n` hashes and radius k."""
    if not 0 <= max_distance < 32:
        raise ValueError(f"max_distance must be between 0 and 31, got {max_distance}")
    fits = [_split(m, max_distance) for m in range(math.ceil(BITS / MAX_TABLE_BITS), BITS + 1)]
    return min(fits, key=lambda layout: layout.cost(max(n, 2)))


def exact_bands(max_distance: int) -> BandLayout:
    """max_distance + 1 bands: two hashes within max_distance bits then agree exactly on at least
    one band (pigeonhole), so a partition by band value never separates a pair."""
    if not 0 <= max_distance < BITS:
        raise ValueError(f"max_distance must be between 0 and {BITS - 1}, got {max_distance}")
    return _split(max_distance + 1, max_distance)


def band_values(hashes: np.ndarray, layout: BandLayout, band: int) -> np.ndarray:
    """Each uint64 hash's value in one band."""
    mask = np.uint64((1 << layout.widths[band]) - 1)
    return (np.asarray(hashes, np.uint64) >> np.uint64(layout.shifts[band])) & mask


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every band value XOR mask within `radius` bits (0 first)."""
    masks = [0]
    for d in range(1, min(radius, width) + 1):
        masks += [sum(1 << bit for bit in bits) for bits in combinations(range(width), d)]
    return np.array(masks, dtype=np.uint64)


@numba.njit(cache=True, inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@numba.njit(cache=True)
def _bucket(values, shift, width, order):
    """Counting sort of the hashes by one band: bucket offsets, and the hashes (into `order`, their
    indices) in bucket order."""
    n_buckets = 1 << width
    mask = np.uint64(n_buckets - 1)
    offsets = np.zeros(n_buckets + 1, np.int64)
    for h in values:
        offsets[np.int64((h >> np.uint64(shift)) & mask) + 1] += 1
    for b in range(n_buckets):
        offsets[b + 1] += offsets[b]
    fill = offsets[:-1].copy()
    ordered = np.empty(len(values), np.uint64)
    for i in range(len(values)):
        b = np.int64((values[i] >> np.uint64(shift)) & mask)
        order[fill[b]], ordered[fill[b]] = i, values[i]
        fill[b] += 1
    return offsets, ordered


@numba.njit(cache=True, parallel=True)
def _probe_band(band, shifts, widths, radius, max_distance, flips, offsets, order, ordered, chunk, cap):
    """Pairs within `max_distance` whose band `band` is within `radius` and no earlier band is, each
    found once: from the hash with the smaller band value (the lower index when they are equal).

    Hashes are visited in bucket order, a chunk at a time, one flip mask after another: the buckets
    a chunk probes for one mask are then a few neighbouring stretches of the table, not random
    places in it. Each chunk writes into its own `cap` slots (a count above `cap` asks for a rerun)."""
    n = len(ordered)
    n_chunks = (n + chunk - 1) // chunk
    out_i = np.empty(n_chunks * cap, np.int64)
    out_j = np.empty(n_chunks * cap, np.int64)
    counts = np.zeros(n_chunks, np.int64)
    shift, mask = np.uint64(shifts[band]), np.uint64((1 << widths[band]) - 1)
    for c in numba.prange(n_chunks):
        found = 0
        for f in flips:
            for p in range(c * chunk, min(n, (c + 1) * chunk)):
                h = ordered[p]
                key = (h >> shift) & mask
                v = key ^ f
                if v < key:
                    continue  # the pair is found from the other side, whose band value is the smaller
                i = order[p]
                for q in range(offsets[np.int64(v)], offsets[np.int64(v) + 1]):
                    j = order[q]
                    if v == key and j <= i:
                        continue  # the same band value: from the lower index only
                    x = h ^ ordered[q]
                    if _popcount(x) > max_distance:
                        continue
                    earlier = False
                    for b in range(band):
                        part = (x >> np.uint64(shifts[b])) & np.uint64((1 << widths[b]) - 1)
                        if _popcount(part) <= radius:
                            earlier = True
                            break
                    if earlier:
                        continue
                    if found < cap:
                        out_i[c * cap + found], out_j[c * cap + found] = min(i, j), max(i, j)
                    found += 1
        counts[c] = found
    return out_i, out_j, counts


def _pairs_in_band(values: np.ndarray, layout: BandLayout, band: int, max_distance: int) -> tuple[np.ndarray, ...]:
    order = np.empty(len(values), np.int32 if len(values) < 2**31 else np.int64)
    offsets, ordered = _bucket(values, layout.shifts[band], layout.widths[band], order)
    flips = _flip_masks(layout.widths[band], layout.radius)
    shifts, widths = np.array(layout.shifts, np.int64), np.array(layout.widths, np.int64)
    chunk, cap = 1 << 15, 256
    while True:
        out_i, out_j, counts = _probe_band(
            band, shifts, widths, layout.radius, max_distance, flips, offsets, order, ordered, chunk, cap
        )
        if counts.max(initial=0) <= cap:
            keep = (np.arange(cap)[None, :] < counts[:, None]).ravel()
            return out_i[keep], out_j[keep]
        cap = int(counts.max())  # a dense cluster: rerun the band with room for the fullest chunk


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(a, np.uint64) ^ np.asarray(b, np.uint64))


def near_pairs_unique(values: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of distinct `values` (uint64, no repeats) within `max_distance` bits,
    sorted by (i, j)."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    n = len(values)
    if n < 2 or max_distance == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    layout = band_layout(n, max_distance)
    found = [_pairs_in_band(values, layout, band, max_distance) for band in range(len(layout.widths))]
    i, j = np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
    order = np.lexsort((j, i))
    return i[order], j[order]


def to_signed(hashes: np.ndarray) -> np.ndarray:
    """uint64 -> int64 with the same bits, for parquet/Arrow columns."""
    return hashes.astype(np.uint64).view(np.int64)


def to_unsigned(hashes: np.ndarray) -> np.ndarray:
    return np.asarray(hashes, dtype=np.int64).view(np.uint64)
