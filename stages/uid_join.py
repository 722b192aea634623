"""Precomputed embeddings matched to download shards by uid in tasks: a hash join, no pool in the driver.

1. A task per converted (per-npz) table writes its (uid, file, file_row) by uid bucket, and a task
   per download shard its successful rows' (uid, shard, row) by the same buckets
   (`stages.partitioned`).
2. A task per bucket keeps each uid's first (file, file_row), the lowest file then row (a uid two
   npz files hold is taken once), joins it to the shards' rows and writes the matches by shard.
3. A task per download shard reads its matches and gathers its rows' embeddings, in its own row
   order.
The driver holds file names and counts; a bucket task about `ROWS_PER_BUCKET` rows of each side.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import write_parquet
from pipeline.mapping import MapFn
from stages.partitioned import gather_partition, write_partitioned
from stages.selection import shard_rows
from stages.source_parts import uid_buckets

ROWS_PER_BUCKET = 2_000_000
FEATURES = pa.schema([("uid", pa.string()), ("file", pa.int32()), ("file_row", pa.int64())])
DOWNLOADED = pa.schema([("uid", pa.string()), ("shard", pa.int32()), ("row", pa.int64())])
MATCHES = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("file", pa.int32()), ("file_row", pa.int64())])


@dataclass(frozen=True)
class SideJob:
    path: str  # a converted table, or a download shard's tar
    index: int
    buckets: int
    out: str


def features_side(job: SideJob) -> int:
    uids = pq.read_table(job.path, columns=["uid"]).column("uid")
    n = len(uids)
    table = pa.table([uids, np.full(n, job.index, np.int32), np.arange(n, dtype=np.int64)], schema=FEATURES)
    write_partitioned(table, uid_buckets(uids.to_pylist(), job.buckets), job.out)
    return n


def downloaded_side(job: SideJob) -> int:
    rows = shard_rows([job.path])
    table = rows.set_column(1, "shard", pa.array(np.full(rows.num_rows, job.index, np.int32)))
    write_partitioned(table.cast(DOWNLOADED), uid_buckets(table.column("uid").to_pylist(), job.buckets), job.out)
    return table.num_rows


@dataclass(frozen=True)
class BucketJob:
    features: tuple[str, ...]
    downloaded: tuple[str, ...]
    bucket: int
    out: str


def join_bucket(job: BucketJob) -> int:
    index = gather_partition(job.features, job.bucket) or FEATURES.empty_table()
    index = index.take(pc.index_in(pc.unique(index.column("uid")), value_set=index.column("uid")))  # first only
    rows = gather_partition(job.downloaded, job.bucket) or DOWNLOADED.empty_table()
    matches = rows.join(index, "uid", join_type="inner").select(MATCHES.names).cast(MATCHES)
    write_partitioned(matches, matches.column("shard").to_numpy().astype(np.int64), job.out)
    return matches.num_rows


@dataclass(frozen=True)
class GatherJob:
    joins: tuple[str, ...]
    shard: int
    files: tuple[str, ...]  # the converted tables, by file index
    schema: pa.Schema
    out: str


def gather_shard(job: GatherJob) -> int:
    """The shard's embeddings, in its row order, from the converted tables its uids were found in."""
    matches = gather_partition(job.joins, job.shard)
    if matches is None or matches.num_rows == 0:
        write_parquet(Path(job.out), job.schema.empty_table())
        return 0
    matches = matches.sort_by("row")
    file, file_row = matches.column("file").to_numpy(), matches.column("file_row").to_numpy()
    used = np.unique(file)
    at = [np.flatnonzero(file == u) for u in used]
    parts = [pq.read_table(job.files[u]).take(file_row[a]) for u, a in zip(used, at, strict=True)]
    table = pa.concat_tables(parts).take(np.argsort(np.concatenate(at)))
    write_parquet(Path(job.out), table)
    return table.num_rows


def regroup_by_shard(files: list[Path], tars: list[str], out_dir: Path, work: Path, map_fn: MapFn) -> tuple[int, int]:
    """One table per download shard under `out_dir` (its rows in the shard's order; samples no
    table covers are absent). Returns (rows written, samples downloaded)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return _join_and_gather(files, tars, out_dir, work, map_fn)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _join_and_gather(files: list[Path], tars: list[str], out_dir: Path, work: Path, map_fn: MapFn) -> tuple[int, int]:
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    buckets = max(1, math.ceil(rows / ROWS_PER_BUCKET))
    features = [SideJob(str(f), i, buckets, str(work / f"features-{i:07d}.parquet")) for i, f in enumerate(files)]
    shards = [SideJob(t, i, buckets, str(work / f"shard-{i:07d}.parquet")) for i, t in enumerate(tars)]
    map_fn(features_side, features, desc="embed: uid buckets", weight=lambda n: n)
    downloaded = sum(map_fn(downloaded_side, shards, desc="embed: shard uids", weight=lambda n: n))
    joins = [
        BucketJob(tuple(j.out for j in features), tuple(j.out for j in shards), b, str(work / f"join-{b:07d}.parquet"))
        for b in range(buckets)
    ]
    map_fn(join_bucket, joins, desc="embed: uid join")
    schema = pq.read_schema(files[0])
    gathers = [
        GatherJob(
            tuple(j.out for j in joins), i, tuple(map(str, files)), schema, str(out_dir / f"{Path(t).stem}.parquet")
        )
        for i, t in enumerate(tars)
    ]
    found = sum(map_fn(gather_shard, gathers, desc="embed: by shard", weight=lambda n: n))
    return found, downloaded
