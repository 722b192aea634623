"""Semantic de-duplication (SemDeDup, Abbas et al. 2023) on image embeddings.

k-means splits the pool into clusters; inside each cluster, samples are visited from the least
to the most typical (ascending cosine similarity to the centroid, uid breaking ties) and a sample
is dropped when its similarity to an already kept one exceeds 1 - epsilon. Pairwise work stays
inside clusters, so the cost is sum(cluster size^2), not pool size^2. The fraction removed at
several epsilons is reported so users can pick epsilon for their pool.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from filters.base import FilterResult, embedding_matrix, from_mask
from filters.clustering import default_clusters, fit_centroids, nearest_centroid, unit_rows
from pipeline.mapping import MapFn, local_map
from pipeline.models import StrictModel

NEEDS = ("image_emb",)


class SemanticDedupeParams(StrictModel):
    name: Literal["semantic_dedupe"] = "semantic_dedupe"
    epsilon: float = Field(0.05, gt=0, lt=1, description="drop when cosine similarity to a kept sample > 1 - epsilon")
    n_clusters: int = Field(50_000, gt=0, description="k-means clusters (SemDeDup on LAION-440M: 50,000)")
    min_cluster_size: int = Field(1_000, gt=0, description="fewer clusters on small pools: rows per cluster")
    report_epsilons: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2])
    seed: int = 0


def greedy_keep(similarity: np.ndarray, thresholds: list[float]) -> list[np.ndarray]:
    """For rows in visiting order, one keep mask per threshold: keep a row unless it is > threshold to a kept row."""
    masks = []
    for threshold in thresholds:
        keep = np.zeros(len(similarity), bool)
        for row in range(len(similarity)):
            keep[row] = not (similarity[row, :row][keep[:row]] > threshold).any()
        masks.append(keep)
    return masks


ClusterWork = list[tuple[np.ndarray, np.ndarray]]  # (row indices in visiting order, their embeddings)


def dedupe_clusters(item: tuple[ClusterWork, list[float]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per cluster: (rows, similarity to the nearest other member, one keep mask per threshold)."""
    clusters, thresholds = item
    out = []
    for rows, embeddings in clusters:
        similarity = embeddings @ embeddings.T
        np.fill_diagonal(similarity, -1.0)
        nearest = similarity.max(axis=1) if len(rows) > 1 else np.full(len(rows), np.nan, np.float32)
        out.append((rows, nearest, np.stack(greedy_keep(similarity, thresholds))))
    return out


def _batches(clusters: ClusterWork, target_rows: int) -> list[ClusterWork]:
    """Group clusters into work items of about `target_rows` rows (one Ray task each, not one per cluster)."""
    batches: list[ClusterWork] = [[]]
    size = 0
    for cluster in clusters:
        if size >= target_rows:
            batches.append([])
            size = 0
        batches[-1].append(cluster)
        size += len(cluster[0])
    return batches


def apply(
    table: pa.Table, params: SemanticDedupeParams, map_fn: MapFn = local_map, pool: FilterResult | None = None
) -> FilterResult:
    """k-means, then the pairwise step of each cluster, batched through `map_fn`. A shard passes its
    rows' share of the whole pool's result as `pool` (the pairs it compares span the pool)."""
    if pool is not None:
        if pool.uids != table.column("uid").to_pylist():
            raise ValueError("semantic_dedupe: the pool's verdicts are not this shard's rows")
        return pool
    uids = table.column("uid").to_pylist()
    embeddings = unit_rows(embedding_matrix(table, "image_emb"))
    n = len(embeddings)
    epsilons = all_epsilons(params)
    thresholds = [1 - e for e in epsilons]
    keeps = np.ones((len(epsilons), n), bool)
    nearest = np.full(n, np.nan, np.float32)
    if n:
        n_clusters = default_clusters(n, params.n_clusters, params.min_cluster_size)
        centroids = fit_centroids(embeddings, n_clusters, params.seed)
        assignment, typicality = nearest_centroid(embeddings, centroids, map_fn)
        uid_rank = np.argsort(np.argsort(np.asarray(uids, dtype=str)))
        clusters = []
        for cluster in np.unique(assignment):
            members = np.flatnonzero(assignment == cluster)
            members = members[np.lexsort((uid_rank[members], typicality[members]))]  # least typical first
            clusters.append((members, embeddings[members]))
        work = [(batch, thresholds) for batch in _batches(clusters, target_rows=max(1_000, n // 64))]
        for results in map_fn(dedupe_clusters, work, desc="semantic_dedupe: clusters"):
            for rows, cluster_nearest, masks in results:
                nearest[rows] = cluster_nearest
                keeps[:, rows] = masks
    removed = [int((~keep).sum()) for keep in keeps]
    return verdicts(uids, keeps[0], nearest, params, removed, n)


def all_epsilons(params: SemanticDedupeParams) -> list[float]:
    """The epsilon that decides, then the others the report shows."""
    return [params.epsilon, *(e for e in params.report_epsilons if e != params.epsilon)]


def verdicts(
    uids: list[str],
    keep: np.ndarray,
    nearest: np.ndarray,
    params: SemanticDedupeParams,
    removed: list[int],
    pool_rows: int,
) -> FilterResult:
    """The result for `uids` (the pool's, or one shard's share of it); `removed` counts the pool's
    rows dropped at each of `all_epsilons`, for the metrics."""
    result = from_mask(uids, keep, "semantic_dedupe", scores=nearest, threshold=1 - params.epsilon)
    for epsilon, count in zip(all_epsilons(params), removed, strict=True):
        kept_fraction = (pool_rows - count) / pool_rows if pool_rows else 1.0
        result.metrics[f"removed_fraction_eps_{epsilon:g}"] = float(1 - kept_fraction)
    return result
