"""Exact near-duplicate search over 64-bit hashes: all pairs within Hamming distance k.

Multi-index hashing (Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing"):
split the 64 bits into m bands. If two hashes differ in at most k bits, some band differs in at
most r = k // m bits (pigeonhole). Bands are about log2(n) bits wide so that a band value is
shared by few hashes, and m is large enough that r <= 1. For r = 0 candidates share a band
value; for r = 1 they share it after deleting one bit position, one sort per position. Every
candidate is then checked on all 64 bits, so the result is exact: no pair within k is missed and
none beyond k is returned. The work grows about linearly with n for well-spread hashes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BITS = 64


@dataclass(frozen=True)
class BandLayout:
    shifts: tuple[int, ...]
    widths: tuple[int, ...]
    radius: int  # per-band Hamming radius searched (0 or 1)


def band_layout(n: int, max_distance: int) -> BandLayout:
    """Bands of about log2(n) bits, enough of them that the per-band radius is at most 1."""
    if not 0 <= max_distance < 32:
        raise ValueError(f"max_distance must be between 0 and 31, got {max_distance}")
    target_bits = min(32, max(8, math.ceil(math.log2(max(n, 2)))))
    m = min(BITS, max(BITS // target_bits, max_distance // 2 + 1))
    base, extra = divmod(BITS, m)
    widths = tuple(base + (1 if i < extra else 0) for i in range(m))
    shifts = tuple(int(sum(widths[:i])) for i in range(m))
    return BandLayout(shifts, widths, max_distance // m)


def _candidate_keys(values: np.ndarray, layout: BandLayout) -> Iterator[np.ndarray]:
    for shift, width in zip(layout.shifts, layout.widths, strict=True):
        key_type = np.uint32 if width <= 32 else np.uint64  # narrower keys sort faster
        band = ((values >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(key_type)
        if layout.radius == 0:
            yield band
        else:
            for bit in range(width):
                yield band & key_type(~(1 << bit) & ((1 << width) - 1))


def _close_pairs_sharing_key(values: np.ndarray, keys: np.ndarray, max_distance: int) -> np.ndarray:
    """Pairs (as i * n + j, i < j) that share a key and are within `max_distance` on all bits.

    Candidates are compared in key-sorted order, so both sides are read sequentially; only the
    few verified pairs are mapped back to input positions.
    """
    order = np.argsort(keys)
    sorted_keys, sorted_values = keys[order], values[order]
    same_as_next = sorted_keys[1:] == sorted_keys[:-1]
    starts = np.flatnonzero(same_as_next)  # p with sorted_keys[p] == sorted_keys[p + 1]
    found, offset = [], 1
    while len(starts):
        ends = starts + offset
        close = hamming_distance(sorted_values[starts], sorted_values[ends]) <= max_distance
        i, j = order[starts[close]], order[ends[close]]
        found.append(np.minimum(i, j).astype(np.int64) * len(values) + np.maximum(i, j))
        # p pairs with p + offset + 1 only if the run of equal keys goes one step further
        starts = starts[(ends < len(same_as_next)) & same_as_next[np.minimum(ends, len(same_as_next) - 1)]]
        offset += 1
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(a, np.uint64) ^ np.asarray(b, np.uint64))


def near_pairs_unique(values: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of distinct `values` (uint64, no repeats) within `max_distance` bits."""
    values = np.asarray(values, dtype=np.uint64)
    n = len(values)
    if n < 2 or max_distance == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    found = [
        _close_pairs_sharing_key(values, keys, max_distance)
        for keys in _candidate_keys(values, band_layout(n, max_distance))
    ]
    codes = np.unique(np.concatenate(found))
    return codes // n, codes % n


def to_signed(hashes: np.ndarray) -> np.ndarray:
    """uint64 -> int64 with the same bits, for parquet/Arrow columns."""
    return hashes.astype(np.uint64).view(np.int64)


def to_unsigned(hashes: np.ndarray) -> np.ndarray:
    return np.asarray(hashes, dtype=np.int64).view(np.uint64)
