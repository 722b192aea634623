"""k-means over unit-normalised embeddings, shared by `image_based` and `semantic_dedupe`.

Centroids are fitted on at most `fit_sample` rows (a seeded sample), then every row is assigned
in chunks, so memory stays bounded by the chunk, not by the pool.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.mapping import MapFn, local_map

ASSIGN_CHUNK = 65_536


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


FIT_SAMPLE = 500_000


def fit_rows(n_rows: int, seed: int, fit_sample: int | None = None) -> np.ndarray | None:
    """Which rows of a pool of `n_rows` the centroids are fitted on, in the order they are fed (None:
    all, in pool order). A pool read shard by shard gathers exactly these rows."""
    fit_sample = fit_sample or FIT_SAMPLE
    if n_rows <= fit_sample:
        return None
    return np.random.default_rng(seed).choice(n_rows, fit_sample, False)


def fit_centroids(embeddings: np.ndarray, n_clusters: int, seed: int, fit_sample: int | None = None) -> np.ndarray:
    """Unit-norm centroids (spherical k-means via k-means on unit vectors)."""
    rows = fit_rows(len(embeddings), seed, fit_sample)
    return fit_on(embeddings if rows is None else embeddings[rows], n_clusters, seed)


def fit_on(rows: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Centroids of exactly these rows (already sampled)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n_clusters = max(1, min(n_clusters, len(rows)))
    if len(rows) > 50_000:  # its updates go cluster by cluster: the same centroids on any number of threads
        model = MiniBatchKMeans(n_clusters=n_clusters, n_init=1, random_state=seed, batch_size=4096)
        return unit_rows(model.fit(rows).cluster_centers_)
    # Lloyd's threads add their partial sums in the order they finish: with three or more the
    # centroids vary from fit to fit, and a pool filtered twice (shard by shard, or resumed) would
    # be clustered differently. One thread makes the fit a function of the rows and the seed.
    with threadpool_limits(limits=1):
        model = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(rows)
    return unit_rows(model.cluster_centers_)


TYPICALITY_BLOCK = 4_096


def row_typicality(embeddings: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Each row's cosine similarity to its own centroid (`centroids[assignment]`), as a function of
    that row alone.

    A BLAS product rounds a row differently with the matrix around it (gemv for one row, small-
    matrix kernels, edge tiles), so a shard's rows would rank differently than in the whole pool and
    SemDeDup would keep the other one of two near-identical images. Products of float32 values are
    exact in float64 and each row is summed on its own, so the float32 result does not move."""
    out = np.empty(len(embeddings), np.float32)
    for start in range(0, len(embeddings), TYPICALITY_BLOCK):
        stop = start + TYPICALITY_BLOCK
        own = centroids[assignment[start:stop]].astype(np.float64)
        out[start:stop] = (embeddings[start:stop].astype(np.float64) * own).sum(axis=1)
    return out


def _nearest(chunk: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    embeddings, centroids = chunk
    assignment = (embeddings @ centroids.T).argmax(axis=1)  # a row within a rounding of two centroids is rare
    return assignment, row_typicality(embeddings, centroids, assignment)


def nearest_centroid(
    embeddings: np.ndarray, centroids: np.ndarray, map_fn: MapFn = local_map
) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centroid, its cosine similarity) per row; chunks of rows go through `map_fn`."""
    chunks = [(embeddings[i : i + ASSIGN_CHUNK], centroids) for i in range(0, len(embeddings), ASSIGN_CHUNK)]
    if not chunks:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    parts = map_fn(_nearest, chunks, desc="nearest centroid")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def default_clusters(n_rows: int, wanted: int, min_rows_per_cluster: int) -> int:
    """`wanted` clusters, but never fewer than `min_rows_per_cluster` rows per cluster on average."""
    return max(1, min(wanted, n_rows // max(1, min_rows_per_cluster)))
