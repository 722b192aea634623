"""Slow, obviously correct answers the fast code is checked against (tests and benchmarks)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from filters.hamming import hamming_distance


def brute_force_neighbours(values: np.ndarray, query: int, max_distance: int) -> np.ndarray:
    """Indices j != query within `max_distance` of values[query], by comparing with every hash."""
    distances = hamming_distance(values, values[query])
    hits = np.flatnonzero(distances <= max_distance)
    return hits[hits != query]


def assert_same_decisions(got: pa.Table, expected: pa.Table, score_rtol: float = 0.0) -> None:
    """The same columns, rows and verdicts; scores equal (NaN to NaN), or within `score_rtol` where
    the two sides scored in batches of other sizes (float32 products round differently)."""
    assert got.column_names == expected.column_names
    assert got.column("uid").to_pylist() == expected.column("uid").to_pylist()
    for name in expected.column_names:
        mine = got.column(name).to_numpy(zero_copy_only=False)
        theirs = expected.column(name).to_numpy(zero_copy_only=False)
        assert mine.dtype == theirs.dtype, name
        if mine.dtype.kind == "f":
            assert np.allclose(mine, theirs, rtol=score_rtol, atol=0.0, equal_nan=True), name
        else:
            assert np.array_equal(mine, theirs), name
