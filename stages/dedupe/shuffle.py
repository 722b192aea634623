"""Exact near-duplicate pairs of a pool spread over shards: a shuffle by band value, then one
search per partition.

With radius k the 64 bits split into k + 1 bands, so two hashes within k bits agree exactly on at
least one band (pigeonhole): a partition by (band, band value) never separates a pair.
1. Map: one task per group of shards reads their hashes, numbers each row pool-wide (its shard's
   index, then its row: `row_ids`), and writes one parquet whose row groups are partitions
   (`stages.partitioned`). For each band, an entry (id, hash) goes to the partition its band
   value hashes to.
2. Reduce: one task per partition reads its row group from every map file and finds the pairs
   within k among its hashes with the one-process index (`filters.hamming`), equal hashes linked
   too. Every pair it returns is checked on all 64 bits, so the edges are exact; a pair found in
   several bands is returned several times, and `edges` keeps it once.
No process holds more than one map group's or one partition's entries. A band has at most
2^width values, so at a large radius (k = 8: 9 bands of 7-8 bits) a partition holds at least
1/2^width of the pool whatever `partition_entries` asks: the price of an exact search that wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.hamming import BandLayout, band_values, near_pairs_unique, to_unsigned
from pipeline.mapping import MapFn
from stages.partitioned import gather_partition, write_partitioned

ROW_BITS = 32  # an id is shard index << ROW_BITS | row: shards may hold up to 4 billion rows
ENTRY_SCHEMA = pa.schema([("id", pa.int64()), ("phash", pa.int64())])
SAMPLED_FILES = 16  # hash files whose row counts size the shuffle


@dataclass(frozen=True)
class HashShard:
    index: int  # in the sorted list of hash files
    path: str


def shard_hashes(shard: HashShard, columns: tuple[str, ...] = ("uid", "phash")) -> pa.Table:
    """The shard's hashed rows (a failed hash has none), in file order: row r has id `row_ids`[r]."""
    table = pq.read_table(shard.path, columns=list(dict.fromkeys(("phash", *columns))))
    return table.filter(pc.is_valid(table.column("phash"))).select(list(columns))


def row_ids(shard_index: int, rows: int) -> np.ndarray:
    return (np.int64(shard_index) << np.int64(ROW_BITS)) | np.arange(rows, dtype=np.int64)


@dataclass(frozen=True)
class ShuffleShape:
    bands: BandLayout
    parts: int  # partitions per band
    shards_per_map: int

    @property
    def partitions(self) -> int:
        return len(self.bands.widths) * self.parts


def shuffle_shape(paths: list[Path], bands: BandLayout, map_rows: int, partition_entries: int) -> ShuffleShape:
    """How many shards a map task reads and how many partitions a band has, from the row counts of
    a few files (the shape only balances the work; any shape gives the same pairs)."""
    if not paths:
        return ShuffleShape(bands, 1, 1)
    sampled = paths[:: max(1, len(paths) // SAMPLED_FILES)]
    per_file = max(1.0, float(np.mean([pq.ParquetFile(p).metadata.num_rows for p in sampled])))
    parts = max(1, math.ceil(per_file * len(paths) / partition_entries))
    return ShuffleShape(bands, parts, max(1, int(map_rows // per_file)))


def partition_of(values: np.ndarray, band: int, parts: int) -> np.ndarray:
    """The partition of each band value: Fibonacci hashing spreads nearby values apart."""
    mixed = (values * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return band * parts + (mixed % np.uint64(parts)).astype(np.int64)


@dataclass(frozen=True)
class MapJob:
    shards: tuple[HashShard, ...]
    shape: ShuffleShape
    out: str


def map_shards(job: MapJob) -> int:
    """Write the group's entries, a row group per partition that has any; returns the rows read."""
    tables = [shard_hashes(s, ("phash",)) for s in job.shards]
    ids = np.concatenate([row_ids(s.index, t.num_rows) for s, t in zip(job.shards, tables, strict=True)])
    signed = np.concatenate([t.column("phash").to_numpy() for t in tables]).astype(np.int64)
    hashes = to_unsigned(signed)
    bands = range(len(job.shape.bands.widths))
    parts = np.concatenate([partition_of(band_values(hashes, job.shape.bands, b), b, job.shape.parts) for b in bands])
    n_bands = len(job.shape.bands.widths)
    entries = pa.table([np.tile(ids, n_bands), np.tile(signed, n_bands)], schema=ENTRY_SCHEMA)  # band after band
    write_partitioned(entries, parts, job.out)
    return len(ids)


@dataclass(frozen=True)
class ReduceJob:
    maps: tuple[str, ...]
    part: int
    max_distance: int


def reduce_partition(job: ReduceJob) -> np.ndarray:
    """The (smaller id, larger id) pairs within max_distance among the partition's entries."""
    entries = gather_partition(job.maps, job.part)
    if entries is None:
        return np.zeros((0, 2), np.int64)
    return near_edges(
        entries.column("id").to_numpy(), to_unsigned(entries.column("phash").to_numpy()), job.max_distance
    )


def near_edges(ids: np.ndarray, hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Edges linking every two rows within max_distance bits: rows of one hash value to the value's
    first row, and the first rows of values near each other."""
    unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    copies = np.flatnonzero(first[inverse] != np.arange(len(ids)))
    i, j = near_pairs_unique(unique, max_distance)
    a = np.concatenate([ids[first[inverse[copies]]], ids[first[i]]])
    b = np.concatenate([ids[copies], ids[first[j]]])
    return np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0)


def pool_edges(
    shards: list[HashShard], shape: ShuffleShape, work: Path, max_distance: int, map_fn: MapFn
) -> np.ndarray:
    """Every near-duplicate pair of the pool, once, as sorted (id, id) rows."""
    work.mkdir(parents=True, exist_ok=True)
    groups = [tuple(shards[i : i + shape.shards_per_map]) for i in range(0, len(shards), shape.shards_per_map)]
    maps = [MapJob(group, shape, str(work / f"map-{n:06d}.parquet")) for n, group in enumerate(groups)]
    map_fn(map_shards, maps, desc="dedupe: hash bands", weight=lambda rows: rows)
    paths = tuple(m.out for m in maps)
    reduces = [ReduceJob(paths, part, max_distance) for part in range(shape.partitions)]
    found = map_fn(reduce_partition, reduces, desc="dedupe: pairs per partition")
    edges = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    return np.unique(edges, axis=0) if len(edges) else edges
