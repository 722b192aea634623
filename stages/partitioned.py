"""Parquet files whose row groups are partitions: the file format of the shuffles (dedupe's band
shuffle, semantic_dedupe's cluster shuffle).

A map task writes one file with a row group per partition it has rows for, and the partitions'
numbers in the file's metadata; a reduce task reads its partition's row group from every map file.
So a shuffle of M map tasks into P partitions writes M files, not M x P.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PARTS_KEY = b"partitions"  # file metadata: the partitions present, ascending
GROUPS_KEY = b"partition_groups"  # file metadata: each present partition's first row group, then the end
ROW_GROUP_ROWS = 1 << 20  # a large partition spans several row groups of at most this many rows


def write_partitioned(table: pa.Table, parts: np.ndarray, path: str | Path) -> None:
    """`table`'s rows grouped by `parts` (a partition number per row; rows keep their order inside
    a partition), each partition in its own row groups."""
    order = np.argsort(parts, kind="stable")
    present, starts = np.unique(parts[order], return_index=True)
    bounds = np.r_[starts, len(order)].astype(np.int64)
    groups = np.ceil(np.diff(bounds) / ROW_GROUP_ROWS).astype(np.int64)
    first_groups = np.r_[0, np.cumsum(groups)].astype(np.int64)
    metadata = {PARTS_KEY: present.astype(np.int64).tobytes(), GROUPS_KEY: first_groups.tobytes()}
    schema = table.schema.with_metadata(metadata)
    table = table.replace_schema_metadata(metadata)
    with pq.ParquetWriter(str(path), schema) as writer:
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            for piece in range(start, end, ROW_GROUP_ROWS):
                stop = min(end, piece + ROW_GROUP_ROWS)
                writer.write_table(table.take(order[piece:stop]), row_group_size=stop - piece)


def read_partition(path: str | Path, part: int) -> pa.Table | None:
    """One file's rows of partition `part` (None when it has none)."""
    file = pq.ParquetFile(str(path))
    metadata = file.schema_arrow.metadata
    present = np.frombuffer(metadata[PARTS_KEY], np.int64)
    first_groups = np.frombuffer(metadata[GROUPS_KEY], np.int64)
    at = int(np.searchsorted(present, part))
    if at == len(present) or present[at] != part:
        return None
    if file.num_row_groups != first_groups[-1]:
        raise ValueError(f"{path}: {file.num_row_groups} row groups, its partition index says {first_groups[-1]}")
    return file.read_row_groups(list(range(first_groups[at], first_groups[at + 1])))


def gather_partition(paths: list[str] | tuple[str, ...], part: int) -> pa.Table | None:
    """Partition `part`'s rows from every file, in file order (None when no file has any)."""
    tables = [t for t in (read_partition(p, part) for p in paths) if t is not None]
    return pa.concat_tables(tables) if tables else None
