"""pHash de-duplication as a filter over a per-uid table: near-duplicate clusters, one kept each.

Input rows carry `uid` and `phash` (int64 bits of the 64-bit hash). Samples whose hashes are
within `max_distance` bits are linked; linked samples form clusters (connected components), and
each cluster keeps one sample by the chosen policy. The rest are dropped with the reason
`duplicate_of:<kept uid>`. Samples within `eval_max_distance` of any evaluation-set hash are
dropped as `eval_duplicate_of:<eval uid>` first, so test images never leak into training data.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
from pydantic import BeforeValidator, Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from filters.base import FilterResult
from filters.hamming import near_pairs_unique, to_unsigned
from pipeline.models import StrictModel

DUPLICATE = "duplicate_of"
EVAL_DUPLICATE = "eval_duplicate_of"


def _old_keep_name(value: object) -> object:
    """`first` was the name of `lowest_uid` (it never meant input order): old recipes still load."""
    return "lowest_uid" if value == "first" else value


class PhashDedupeParams(StrictModel):
    max_distance: int = Field(4, ge=0, le=16, description="Hamming distance within which two images are duplicates")
    eval_max_distance: int | None = Field(None, ge=0, le=16, description="default: max_distance")
    keep: Annotated[Literal["lowest_uid", "largest", "highest_score"], BeforeValidator(_old_keep_name)] = Field(
        "lowest_uid", description="lowest_uid: the smallest uid (stable across runs); largest; highest_score"
    )
    score_column: str | None = Field(None, description="column ranked by keep=highest_score")


def reason_kind(reason: str | None) -> str | None:
    """'duplicate_of:<uid>' -> 'duplicate_of' (for counting)."""
    return None if reason is None else reason.split(":", 1)[0]


def _cluster_labels(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Connected-component label per row: equal hashes and near pairs are linked."""
    unique, inverse = np.unique(hashes, return_inverse=True)
    i, j = near_pairs_unique(unique, max_distance)
    n = len(unique)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, unique_labels = connected_components(graph, directed=False)
    return unique_labels[inverse]


def _priority(table: pa.Table, params: PhashDedupeParams) -> np.ndarray:
    """Lower is better: the kept sample of a cluster is its lowest-priority row.

    "lowest_uid" and every tie are decided by uid, never by row order: img2dataset writes a shard's
    samples in the order its threads finish, so row order changes from one run to the next.
    """
    uids = np.asarray(table.column("uid").to_pylist(), dtype=str)
    order = np.argsort(np.argsort(uids, kind="stable")).astype(np.float64)
    if params.keep == "lowest_uid":
        return order
    if params.keep == "largest":
        for width, height in (("original_width", "original_height"), ("width", "height")):
            if width in table.column_names and height in table.column_names:
                area = table.column(width).to_numpy(zero_copy_only=False).astype(np.float64) * table.column(
                    height
                ).to_numpy(zero_copy_only=False).astype(np.float64)
                return -np.nan_to_num(area, nan=0.0) + order / (table.num_rows + 1)
        raise ValueError("keep=largest needs width/height columns in the hash table")
    column = params.score_column
    if not column or column not in table.column_names:
        raise ValueError(f"keep=highest_score needs score_column naming a column of the table (got {column!r})")
    scores = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    return -np.nan_to_num(scores, nan=-np.inf) + order / (table.num_rows + 1) * 1e-9


def phash_dedupe(
    table: pa.Table,
    params: PhashDedupeParams,
    eval_uids: list[str] | None = None,
    eval_hashes: np.ndarray | None = None,
) -> FilterResult:
    """Keep one sample per near-duplicate cluster and none that copies an evaluation image."""
    uids = table.column("uid").to_pylist()
    hashes = to_unsigned(table.column("phash").to_numpy())
    reasons: list[str | None] = [None] * len(uids)
    keep = np.ones(len(uids), dtype=bool)

    if eval_hashes is not None and len(eval_hashes):
        eval_rows = _eval_matches(hashes, np.asarray(eval_hashes, np.uint64), params)
        for row in np.flatnonzero(eval_rows >= 0).tolist():
            keep[row] = False
            reasons[row] = f"{EVAL_DUPLICATE}:{eval_uids[eval_rows[row]]}"

    labels = _cluster_labels(hashes, params.max_distance)
    priority = _priority(table, params)
    candidates = np.flatnonzero(keep)  # eval copies neither represent nor join a cluster
    order = candidates[np.lexsort((priority[candidates], labels[candidates]))]
    first_of_cluster = np.ones(len(order), dtype=bool)
    first_of_cluster[1:] = labels[order][1:] != labels[order][:-1]
    representative = {}
    for row, is_first in zip(order.tolist(), first_of_cluster.tolist(), strict=True):
        label = labels[row]
        if is_first:
            representative[label] = row
        else:
            keep[row] = False
            reasons[row] = f"{DUPLICATE}:{uids[representative[label]]}"
    return FilterResult(uids, keep, reasons)


def _eval_matches(pool: np.ndarray, evals: np.ndarray, params: PhashDedupeParams) -> np.ndarray:
    """Per pool row, the index of an evaluation image within eval_max_distance, or -1.

    Pool and eval hashes go into one index, so the search costs the same as the pool's own.
    """
    distance = params.max_distance if params.eval_max_distance is None else params.eval_max_distance
    unique, inverse = np.unique(np.concatenate([pool, evals]), return_inverse=True)
    pool_value, eval_value = inverse[: len(pool)], inverse[len(pool) :]
    eval_row_of_value = np.full(len(unique), -1)
    eval_row_of_value[eval_value] = np.arange(len(evals))
    nearest_eval = eval_row_of_value.copy()  # equal values first, then near ones
    i, j = near_pairs_unique(unique, distance)
    for src, dst in ((i, j), (j, i)):
        hit = (eval_row_of_value[dst] >= 0) & (nearest_eval[src] < 0)
        nearest_eval[src[hit]] = eval_row_of_value[dst[hit]]
    return nearest_eval[pool_value]
