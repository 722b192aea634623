"""The shuffles' file format: a partition's rows come back whole and in order, even when it spans
several row groups, and a partition a file lacks reads as None."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from stages import partitioned


def test_partitions_read_back_whole_across_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(partitioned, "ROW_GROUP_ROWS", 3)
    parts = np.array([2, 0, 2, 2, 5, 0, 2, 2, 2, 2, 5, 0, 0, 0, 0, 2, 2, 2, 7, 0])
    path = tmp_path / "map.parquet"
    partitioned.write_partitioned(pa.table({"row": np.arange(len(parts))}), parts, path)
    for part in (0, 1, 2, 5, 7, 9):
        read = partitioned.read_partition(path, part)
        expected = np.flatnonzero(parts == part)
        if not len(expected):
            assert read is None
        else:
            assert read.column("row").to_numpy().tolist() == expected.tolist()
    both = partitioned.gather_partition([str(path), str(path)], 5)
    assert both.column("row").to_pylist() == [4, 10, 4, 10]
    empty = tmp_path / "empty.parquet"
    partitioned.write_partitioned(pa.table({"row": np.zeros(0, np.int64)}), np.zeros(0, np.int64), empty)
    assert partitioned.read_partition(empty, 0) is None and partitioned.gather_partition([str(empty)], 0) is None
