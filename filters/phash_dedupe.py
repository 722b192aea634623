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
import pyarrow.compute as pc
from pydantic import BeforeValidator, Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from filters.base import FilterResult, column_numpy
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


def priority_key(table: pa.Table, params: PhashDedupeParams) -> np.ndarray:
    """Lower is better: a cluster keeps its row with the lowest key, ties to the lowest uid
    (`cluster_keepers`). "lowest_uid" is all ties, so uid alone decides.

    Never row order: img2dataset writes a shard's samples in the order its threads finish, so row
    order changes from one run to the next.
    """
    if params.keep == "lowest_uid":
        return np.zeros(table.num_rows)
    if params.keep == "largest":
        for width, height in (("original_width", "original_height"), ("width", "height")):
            if width in table.column_names and height in table.column_names:
                area = column_numpy(table, width) * column_numpy(table, height)
                return -np.nan_to_num(area, nan=0.0)
        raise ValueError("keep=largest needs width/height columns in the hash table")
    column = params.score_column
    if not column or column not in table.column_names:
        raise ValueError(f"keep=highest_score needs score_column naming a column of the table (got {column!r})")
    return -np.nan_to_num(column_numpy(table, column), nan=-np.inf)


def cluster_keepers(labels: np.ndarray, uids: pa.Array, key: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Per row, the row its cluster keeps: the eligible row of its label with the lowest `key`, ties
    to the lowest uid; -1 for a row that is not eligible (an eval copy neither represents nor joins
    a cluster, though it may link two)."""
    rows = np.flatnonzero(eligible)
    candidates = pa.table({"label": labels[rows], "key": key[rows], "uid": pa.array(uids).take(rows)})
    order = rows[pc.sort_indices(candidates, [("label", "ascending"), ("key", "ascending"), ("uid", "ascending")])]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = labels[order][1:] != labels[order][:-1]
    keepers = np.full(len(labels), -1, dtype=np.int64)
    keepers[order] = order[starts][np.cumsum(starts) - 1]
    return keepers


def phash_dedupe(
    table: pa.Table,
    params: PhashDedupeParams,
    eval_uids: list[str] | None = None,
    eval_hashes: np.ndarray | None = None,
) -> FilterResult:
    """Keep one sample per near-duplicate cluster and none that copies an evaluation image.

    The whole table in one process: the filter form, and the oracle the sharded stage is tested on.
    """
    uids = table.column("uid").to_pylist()
    hashes = to_unsigned(table.column("phash").to_numpy())
    reasons: list[str | None] = [None] * len(uids)
    keep = np.ones(len(uids), dtype=bool)

    if eval_hashes is not None and len(eval_hashes):
        eval_rows = eval_matches(hashes, np.asarray(eval_hashes, np.uint64), eval_distance(params))
        for row in np.flatnonzero(eval_rows >= 0).tolist():
            keep[row] = False
            reasons[row] = f"{EVAL_DUPLICATE}:{eval_uids[eval_rows[row]]}"

    labels = _cluster_labels(hashes, params.max_distance)
    keepers = cluster_keepers(labels, table.column("uid").combine_chunks(), priority_key(table, params), keep)
    for row, keeper in enumerate(keepers.tolist()):
        if keeper >= 0 and keeper != row:
            keep[row] = False
            reasons[row] = f"{DUPLICATE}:{uids[keeper]}"
    return FilterResult(uids, keep, reasons)


def eval_distance(params: PhashDedupeParams) -> int:
    return params.max_distance if params.eval_max_distance is None else params.eval_max_distance


def eval_matches(pool: np.ndarray, evals: np.ndarray, distance: int) -> np.ndarray:
    """Per pool row (uint64 hashes), the index of an evaluation image within `distance` bits, or -1.

    Pool and eval hashes go into one index. A row equal to an eval hash names that hash's last eval
    image; otherwise, among the eval hashes within `distance`, the largest above its own value, else
    the largest below it. That depends only on the hash values, not on the other pool rows, so a
    shard's rows get the same answer as the whole pool's.
    """
    unique, inverse = np.unique(np.concatenate([pool, evals]), return_inverse=True)
    pool_value, eval_value = inverse[: len(pool)], inverse[len(pool) :]
    eval_row_of_value = np.full(len(unique), -1)
    np.maximum.at(eval_row_of_value, eval_value, np.arange(len(evals)))
    nearest_eval = eval_row_of_value.copy()  # equal values first, then near ones
    i, j = near_pairs_unique(unique, distance)  # i < j: a value above, then one below
    for src, dst in ((i, j), (j, i)):
        hit = (eval_row_of_value[dst] >= 0) & (nearest_eval[src] < 0)
        src, dst = src[hit], dst[hit]
        order = np.lexsort((dst, src))
        src, dst = src[order], dst[order]
        largest = np.append(src[1:] != src[:-1], True)[: len(src)]  # each row's largest eval value on this side
        nearest_eval[src[largest]] = eval_row_of_value[dst[largest]]
    return nearest_eval[pool_value]
