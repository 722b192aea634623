"""Slow, obviously correct answers the fast code is checked against (tests and benchmarks)."""

from __future__ import annotations

import numpy as np

from filters.hamming import hamming_distance


def brute_force_neighbours(values: np.ndarray, query: int, max_distance: int) -> np.ndarray:
    """Indices j != query within `max_distance` of values[query], by comparing with every hash."""
    distances = hamming_distance(values, values[query])
    hits = np.flatnonzero(distances <= max_distance)
    return hits[hits != query]
