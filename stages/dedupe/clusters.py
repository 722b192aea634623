"""Near-duplicate clusters from the pool's edge list, then each shard's decisions.

Only rows that have a near-duplicate (the edges' nodes) need a pool-wide choice; every other row
is kept, or dropped as an evaluation copy, by its own shard's task.
1. `components`: connected components over the edges, in the driver.
2. `node_facts`: a task per shard with nodes reads those rows' uids, whether they copy an
   evaluation image, and their sizes (keep=largest); scores (keep=highest_score) are read by uid.
3. `filters.phash_dedupe.cluster_keepers` picks each cluster's keeper, as the one-table filter does.
4. `write_shard`: a task per shard writes `decisions/<shard>.parquet` (uid, keep, reason, phash).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from filters.hamming import to_unsigned
from filters.phash_dedupe import (
    DUPLICATE,
    EVAL_DUPLICATE,
    PhashDedupeParams,
    cluster_keepers,
    eval_matches,
    priority_key,
    reason_kind,
)
from pipeline.mapping import MapFn, resolved
from stages.dedupe.shuffle import ROW_BITS, HashShard, shard_hashes

SIZE_COLUMNS = ("width", "height", "original_width", "original_height")


@dataclass(frozen=True)
class EvalSet:
    keys: list[str]
    hashes: np.ndarray  # uint64
    distance: int

    def matches(self, hashes: np.ndarray) -> np.ndarray:
        """Per hash, the index of an evaluation image within `distance` bits, or -1."""
        if not len(self.hashes):
            return np.full(len(hashes), -1)
        return eval_matches(hashes, self.hashes, self.distance)


def components(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, label per node): the ids the edges name, sorted, and their connected component."""
    nodes, inverse = np.unique(edges.ravel(), return_inverse=True)
    ends = inverse.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(ends), np.int8), (ends[:, 0], ends[:, 1])), shape=(len(nodes), len(nodes)))
    return nodes, connected_components(graph, directed=False)[1]


def by_shard(ids: np.ndarray, shards: int) -> list[np.ndarray]:
    """Sorted ids -> per shard index, the positions of its ids in `ids`."""
    bounds = np.searchsorted(ids >> np.int64(ROW_BITS), np.arange(shards + 1))
    return [np.arange(bounds[s], bounds[s + 1]) for s in range(shards)]


def local_rows(ids: np.ndarray) -> np.ndarray:
    return ids & np.int64((1 << ROW_BITS) - 1)


@dataclass(frozen=True)
class FactsJob:
    shard: HashShard
    rows: np.ndarray  # the shard's rows that have a near-duplicate
    evals: object  # EvalSet, or its reference in Ray's object store
    sizes: bool  # read the image sizes (keep=largest)


def node_facts(job: FactsJob) -> pa.Table:
    """uid, eval_copy (and the sizes) of the shard's rows that have a near-duplicate, in row order."""
    columns = ("uid", "phash", *(SIZE_COLUMNS if job.sizes else ()))
    table = shard_hashes(job.shard, columns).take(job.rows)
    copies = resolved(job.evals).matches(to_unsigned(table.column("phash").to_numpy())) >= 0
    return table.drop_columns(["phash"]).append_column("eval_copy", pa.array(copies))


def with_scores(nodes: pa.Table, scores_path: str, column: str) -> pa.Table:
    """The nodes with their `column` from `scores_path` (uid + column), read for their uids only."""
    scores = pq.read_table(scores_path, columns=["uid", column], filters=pc.field("uid").isin(nodes.column("uid")))
    scores = scores.group_by("uid", use_threads=False).aggregate([(column, "first")]).rename_columns(["uid", column])
    order = pa.array(np.arange(nodes.num_rows))
    joined = nodes.append_column("node", order).join(scores, keys="uid", join_type="left outer")
    return joined.sort_by("node").drop_columns(["node"])


def node_keepers(
    shards: list[HashShard],
    nodes: np.ndarray,
    labels: np.ndarray,
    params: PhashDedupeParams,
    scores_path: str | None,
    evals: object,
    map_fn: MapFn,
) -> tuple[pa.Array, np.ndarray]:
    """(uid, keeper position) of every node: the node its cluster keeps, -1 for an eval copy."""
    if len(nodes) == 0:  # no near-duplicates: no cluster to choose in (nor sizes, nor scores to read)
        return pa.array([], pa.string()), np.zeros(0, np.int64)
    positions = by_shard(nodes, len(shards))
    jobs = [
        FactsJob(shard, local_rows(nodes[at]), evals, params.keep == "largest")
        for shard, at in zip(shards, positions, strict=True)
        if len(at)
    ]
    facts = map_fn(node_facts, jobs, desc="dedupe: rows with near-duplicates")
    table = pa.concat_tables(facts)
    if params.keep == "highest_score":
        table = with_scores(table, scores_path, params.score_column)
    eligible = ~table.column("eval_copy").to_numpy(zero_copy_only=False).astype(bool)
    uids = table.column("uid").combine_chunks()
    return uids, cluster_keepers(labels, uids, priority_key(table, params), eligible)


@dataclass(frozen=True)
class WriteJob:
    shard: HashShard
    duplicate_rows: np.ndarray  # rows whose cluster keeps another row
    keeper_uids: pa.Array  # the uid each of them duplicates
    evals: object
    out: str


@dataclass
class ShardCounts:
    rows: int
    kept: int
    dropped: Counter


def write_shard(job: WriteJob) -> ShardCounts:
    table = shard_hashes(job.shard)
    evals = resolved(job.evals)
    matched = evals.matches(to_unsigned(table.column("phash").to_numpy()))
    reasons = np.full(table.num_rows, None, dtype=object)
    for row in np.flatnonzero(matched >= 0).tolist():
        reasons[row] = f"{EVAL_DUPLICATE}:{evals.keys[matched[row]]}"
    if np.any(reasons[job.duplicate_rows] != None):  # noqa: E711 (elementwise)
        raise AssertionError("an evaluation copy was chosen as a near-duplicate of another row")
    reasons[job.duplicate_rows] = [f"{DUPLICATE}:{uid}" for uid in job.keeper_uids.to_pylist()]
    keep = np.array([r is None for r in reasons], dtype=bool)
    decisions = pa.table(
        {
            "uid": table.column("uid"),
            "keep": keep,
            "reason": pa.array(reasons.tolist(), pa.string()),
            "phash": table.column("phash"),
        }
    )
    pq.write_table(decisions, job.out)
    return ShardCounts(table.num_rows, int(keep.sum()), Counter(reason_kind(r) for r in reasons if r is not None))
