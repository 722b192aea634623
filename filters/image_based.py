"""Image-based filter (DataComp's `image_based` baseline): keep clusters near the target classes.

Cluster the pool's image embeddings with k-means; for every target embedding, take its nearest
centroid(s); keep the samples assigned to one of those centroids. DataComp uses 100,000 clusters
and ImageNet training images as targets. Here targets are an `.npy` matrix the user gives (any
target images embedded with the same model), or by default the evaluation classes' zero-shot
text embeddings that the embed stage writes. Intersect with `clip_score` for DataComp-1B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from filters.base import FilterResult, embedding_matrix, from_mask
from filters.clustering import default_clusters, fit_on, fit_rows, nearest_centroid, unit_rows
from pipeline.mapping import MapFn, local_map
from pipeline.models import StrictModel

NEEDS = ("image_emb",)


class ImageBasedParams(StrictModel):
    name: Literal["image_based"] = "image_based"
    targets: str | None = Field(None, description=".npy of target embeddings; default: eval class text embeddings")
    n_clusters: int = Field(100_000, gt=0, description="k-means clusters (DataComp: 100,000)")
    min_cluster_size: int = Field(10, gt=0, description="fewer clusters on small pools: at least this many rows each")
    centroids_per_target: int = Field(1, gt=0, description="nearest centroids each target selects")
    seed: int = 0


def load_targets(path: str) -> np.ndarray:
    try:
        targets = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"image_based targets {path}: not a readable .npy matrix ({err})") from None
    if targets.ndim != 2 or len(targets) == 0:
        raise ValueError(f"image_based targets {path}: need an (n, dim) matrix, got shape {targets.shape}")
    return unit_rows(targets)


def selected_centroids(targets: np.ndarray, centroids: np.ndarray, per_target: int) -> np.ndarray:
    """Indices of the centroids nearest to any target."""
    sims = targets @ centroids.T
    per_target = min(per_target, len(centroids))
    return np.unique(np.argsort(-sims, axis=1)[:, :per_target])


@dataclass(frozen=True)
class PoolCentroids:
    """What a shard needs to decide its rows: the pool's centroids and those near a target."""

    centroids: np.ndarray
    chosen: np.ndarray
    targets: np.ndarray


def fit(sample: np.ndarray, n_rows: int, params: ImageBasedParams) -> PoolCentroids:
    """Centroids fitted on `sample` (the pool's rows `clustering.fit_rows` names, unit-normalised) of
    a pool of `n_rows` usable rows; the cluster count follows the pool, not the sample."""
    if not params.targets:
        raise ValueError("image_based needs targets: an .npy of target embeddings, or the embed stage's classes")
    targets = load_targets(params.targets)
    if len(sample) and targets.shape[1] != sample.shape[1]:
        raise ValueError(f"image_based targets are {targets.shape[1]}-dim but image embeddings {sample.shape[1]}")
    n_clusters = default_clusters(n_rows, params.n_clusters, params.min_cluster_size)
    centroids = fit_on(sample, n_clusters, params.seed)
    return PoolCentroids(centroids, selected_centroids(targets, centroids, params.centroids_per_target), targets)


def apply(
    table: pa.Table, params: ImageBasedParams, map_fn: MapFn = local_map, pool: PoolCentroids | None = None
) -> FilterResult:
    """k-means on a sample, then the assignment of every row, chunk by chunk through `map_fn`. A
    shard passes its `pool`'s centroids; a whole table fits its own."""
    embeddings = unit_rows(embedding_matrix(table, "image_emb"))
    if pool is None:
        rows = fit_rows(len(embeddings), params.seed)
        pool = fit(embeddings if rows is None else embeddings[rows], len(embeddings), params)
    assignment, _ = nearest_centroid(embeddings, pool.centroids, map_fn)
    keep = np.isin(assignment, pool.chosen)
    # score: how close the sample's cluster is to its nearest target, for the report's histogram
    scores = (pool.centroids @ pool.targets.T).max(axis=1)[assignment]
    result = from_mask(table.column("uid").to_pylist(), keep, "image_based", scores=scores)
    result.metrics.update({"clusters": float(len(pool.centroids)), "clusters_kept": float(len(pool.chosen))})
    return result
