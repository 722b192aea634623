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

PARTS_KEY = b"partitions"  # file metadata: the partition of each row group, ascending


def write_partitioned(table: pa.Table, parts: np.ndarray, path: str | Path) -> None:
    """`table`'s rows grouped by `parts` (a partition number per row; rows keep their order inside
    a partition), one row group per partition."""
    order = np.argsort(parts, kind="stable")
    present, starts = np.unique(parts[order], return_index=True)
    bounds = np.r_[starts, len(order)]
    schema = table.schema.with_metadata({PARTS_KEY: present.astype(np.int64).tobytes()})
    table = table.replace_schema_metadata(schema.metadata)
    with pq.ParquetWriter(str(path), schema) as writer:
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            writer.write_table(table.take(order[start:end]), row_group_size=end - start)


def read_partition(path: str | Path, part: int) -> pa.Table | None:
    """One file's rows of partition `part` (None when it has none)."""
    file = pq.ParquetFile(str(path))
    present = np.frombuffer(file.schema_arrow.metadata[PARTS_KEY], np.int64)
    at = int(np.searchsorted(present, part))
    if at == len(present) or present[at] != part:
        return None
    return file.read_row_group(at)


def gather_partition(paths: list[str] | tuple[str, ...], part: int) -> pa.Table | None:
    """Partition `part`'s rows from every file, in file order (None when no file has any)."""
    tables = [t for t in (read_partition(p, part) for p in paths) if t is not None]
    return pa.concat_tables(tables) if tables else None
