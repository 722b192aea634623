"""semantic_dedupe across shards without gathering the pool: a shuffle by k-means cluster.

SemDeDup compares samples only inside a cluster, so each cluster's rows are brought together and
nothing else is:
1. The centroids are fitted on the rows, in the order, that the one-table filter fits on
   (`pool_figures.fit_sample`).
2. Map, a task per shard: each usable row goes to its nearest centroid; (shard, row, cluster,
   typicality, uid, image embedding) are written with a row group per partition of clusters
   (`stages.partitioned`).
3. Reduce, a task per partition: each cluster's rows, least typical first (uid breaking ties),
   through the filter's own pairwise step at every epsilon; the verdicts are written with a row
   group per shard, and the removed counts come back.
4. Each shard's decide task reads its rows' verdicts (`SemanticPiece.load`).
The driver holds the fit sample (as for image_based) and a few counts per partition; a task holds
one shard or one partition (`ROWS_PER_PARTITION` rows on average: a cluster is never split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.base import FilterResult, embedding_matrix
from filters.clustering import default_clusters, fit_on, nearest_centroid, unit_rows
from filters.semantic_dedupe import SemanticDedupeParams, all_epsilons, dedupe_clusters, verdicts
from pipeline.mapping import MapFn, resolved, shared
from stages.partitioned import gather_partition, write_partitioned

ROWS_PER_PARTITION = 200_000  # rows one reduce task holds, on average


@dataclass(frozen=True)
class AssignJob:
    read: object  # pool_figures.ShardRead, with image_emb
    shard: int
    centroids: object  # unit centroids, or their reference in Ray's object store
    partitions: int
    out: str


def assign_shard(job: AssignJob) -> int:
    """Write the shard's usable rows by cluster partition; returns how many."""
    table = job.read.usable()
    cluster, typicality = nearest_centroid(unit_rows(embedding_matrix(table, "image_emb")), resolved(job.centroids))
    n = table.num_rows
    rows = pa.table(
        {
            "shard": pa.array(np.full(n, job.shard, np.int32)),
            "row": pa.array(np.arange(n, dtype=np.int64)),
            "cluster": pa.array(cluster.astype(np.int64)),
            "typicality": pa.array(typicality.astype(np.float32)),
            "uid": table.column("uid"),
            "image_emb": table.column("image_emb"),
        }
    )
    write_partitioned(rows, cluster.astype(np.int64) % job.partitions, job.out)
    return n


@dataclass(frozen=True)
class ClusterJob:
    maps: tuple[str, ...]
    part: int
    thresholds: tuple[float, ...]
    out: str


def dedupe_partition(job: ClusterJob) -> np.ndarray:
    """SemDeDup over the partition's clusters; its verdicts written by shard. Returns the rows
    removed at each threshold."""
    rows = gather_partition(job.maps, job.part)
    if rows is None:  # no cluster of this partition has a row: an empty file, still read by shards
        rows = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("uid", pa.string())]).empty_table()
        empty = np.ones((len(job.thresholds), 0), bool)
        write_partitioned(_verdict_table(rows, np.zeros(0, np.float32), empty), np.zeros(0, np.int64), job.out)
        return np.zeros(len(job.thresholds), np.int64)
    order = pc.sort_indices(
        rows.select(["cluster", "typicality", "uid"]),
        [("cluster", "ascending"), ("typicality", "ascending"), ("uid", "ascending")],
    ).to_numpy()
    cluster = rows.column("cluster").to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
    embeddings = unit_rows(embedding_matrix(rows, "image_emb"))
    members = [order[a:b] for a, b in zip(starts, np.r_[starts[1:], len(order)], strict=True)]
    nearest = np.full(rows.num_rows, np.nan, np.float32)
    keeps = np.ones((len(job.thresholds), rows.num_rows), bool)
    for at, cluster_nearest, masks in dedupe_clusters(([(m, embeddings[m]) for m in members], list(job.thresholds))):
        nearest[at] = cluster_nearest
        keeps[:, at] = masks
    table = _verdict_table(rows, nearest, keeps)
    write_partitioned(table, rows.column("shard").to_numpy().astype(np.int64), job.out)
    return (~keeps).sum(axis=1)


def _verdict_table(rows: pa.Table, nearest: np.ndarray, keeps: np.ndarray) -> pa.Table:
    columns = {"row": rows.column("row"), "uid": rows.column("uid"), "nearest": pa.array(nearest, pa.float32())}
    columns.update({f"keep_{i}": pa.array(keep) for i, keep in enumerate(keeps)})
    return pa.table(columns)


@dataclass(frozen=True)
class SemanticPiece:
    """Where one shard's semantic_dedupe verdicts are, and the pool's figures they go with."""

    verdict_files: tuple[str, ...]
    shard: int
    params: SemanticDedupeParams
    removed: tuple[int, ...]
    pool_rows: int

    def load(self, uids: list[str]) -> FilterResult:
        """The verdicts of the shard's usable rows (`uids`, in their order)."""
        keep = np.ones(len(uids), bool)
        nearest = np.full(len(uids), np.nan, np.float32)
        table = gather_partition(self.verdict_files, self.shard)
        rows = np.zeros(0, np.int64) if table is None else table.column("row").to_numpy()
        if len(rows) != len(uids) or len(np.unique(rows)) != len(uids):
            raise ValueError(f"semantic_dedupe: shard {self.shard} has {len(rows)} verdicts for {len(uids)} rows")
        if table is not None:
            if pa.array(uids, pa.string()).take(rows).to_pylist() != table.column("uid").to_pylist():
                raise ValueError(f"semantic_dedupe: shard {self.shard}'s verdicts name other uids than its rows")
            keep[rows] = table.column("keep_0").to_numpy(zero_copy_only=False)
            nearest[rows] = table.column("nearest").to_numpy(zero_copy_only=False)
        return verdicts(uids, keep, nearest, self.params, list(self.removed), self.pool_rows)


def pool_semantic_pieces(
    params: SemanticDedupeParams,
    reads: list,
    usable: list[int],
    work: Path,
    map_fn: MapFn,
    fit_sample,
) -> dict[str, SemanticPiece]:
    """Each shard's piece: the map and reduce passes run here, their files under `work` (kept until
    the decide tasks have read them)."""
    n_rows = sum(usable)
    work.mkdir(parents=True, exist_ok=True)
    n_clusters = default_clusters(n_rows, params.n_clusters, params.min_cluster_size)
    sample = fit_sample(reads, usable, params.seed, map_fn, "filter: semantic_dedupe sample")
    centroids = shared(fit_on(sample, n_clusters, params.seed) if n_rows else np.zeros((1, 1), np.float32))
    partitions = max(1, math.ceil(n_rows / ROWS_PER_PARTITION))
    maps = [AssignJob(r, i, centroids, partitions, str(work / f"map-{i:07d}.parquet")) for i, r in enumerate(reads)]
    map_fn(assign_shard, maps, desc="filter: semantic_dedupe clusters", weight=lambda n: n)
    thresholds = tuple(1 - e for e in all_epsilons(params))
    paths = tuple(m.out for m in maps)
    reduces = [ClusterJob(paths, p, thresholds, str(work / f"verdicts-{p:07d}.parquet")) for p in range(partitions)]
    removed = np.sum(map_fn(dedupe_partition, reduces, desc="filter: semantic_dedupe pairs"), axis=0)
    verdict_files = tuple(r.out for r in reduces)
    removed = tuple(int(r) for r in np.atleast_1d(removed))
    return {r.stem: SemanticPiece(verdict_files, i, params, removed, n_rows) for i, r in enumerate(reads)}
