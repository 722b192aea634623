"""Rank filter: keep samples by any score column, at a fixed threshold or the top fraction of the pool.

One filter serves every score the pipeline computes. `clip_score` (DataComp's CLIP-score
baseline: cosine similarity of a pair's image and text embeddings) and `dfn` (the same score under
a Data Filtering Network, column `dfn_score`) are its named forms, so recipes and presets keep
those names; `{name: rank, column: <score>}` ranks any other column (e.g. a metadata score).

Top-fraction selection ranks globally by (score descending, uid ascending), so the kept set
depends only on the scores, never on how the pool was sharded or ordered. Missing scores (NaN)
are never kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from filters.base import FilterResult, column_numpy, from_mask
from pipeline.models import StrictModel

NAMED_COLUMNS = {"clip_score": "clip_score", "dfn": "dfn_score"}  # filter name -> the score it ranks


class RankParams(StrictModel):
    name: Literal["rank", "clip_score", "dfn"] = "rank"
    column: str | None = Field(None, description="score column to rank; clip_score/dfn name their own")
    threshold: float | None = Field(None, description="keep scores >= threshold")
    top_fraction: float | None = Field(None, gt=0, le=1, description="keep this fraction of the pool, best first")
    better: Literal["higher", "lower"] = Field(
        "higher", description="lower: keep scores <= threshold, or the lowest fraction (e.g. punsafe, pwatermark)"
    )

    @model_validator(mode="after")
    def _one_rule(self) -> RankParams:
        if (self.threshold is None) == (self.top_fraction is None):
            raise ValueError("set exactly one of threshold or top_fraction")
        if self.name == "rank" and not self.column:
            raise ValueError("the rank filter needs column=<score column>")
        if self.name != "rank" and self.column not in (None, NAMED_COLUMNS[self.name]):
            raise ValueError(
                f"filter '{self.name}' ranks '{NAMED_COLUMNS[self.name]}'; use name=rank for '{self.column}'"
            )
        return self

    @property
    def score_column(self) -> str:
        return self.column or NAMED_COLUMNS[self.name]


@dataclass(frozen=True)
class Cutoff:
    """The last row a top-fraction ranking keeps: every row ranked at or above it is kept.

    Rows rank by (score descending, uid ascending). `key` is the order key of its score (see
    `order_keys`); None keeps nothing. Knowing only this pair, any shard decides its own rows.
    """

    key: int | None
    uid: str = ""

    @property
    def score(self) -> float:
        return float("inf") if self.key is None else key_scores(np.array([self.key], np.uint64))[0]


KEEP_NONE = Cutoff(None)
_SIGN = np.uint64(1 << 63)


def order_keys(scores: np.ndarray) -> np.ndarray:
    """NaN-free float64 scores as uint64 keys in the same order (-0.0 and 0.0 share one key), so
    an exact rank can be found by counting key digits, shard by shard."""
    bits = (np.asarray(scores, np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_scores(keys: np.ndarray) -> np.ndarray:
    """The inverse of `order_keys`."""
    keys = np.asarray(keys, np.uint64)
    return np.where(keys & _SIGN, keys & ~_SIGN, ~keys).view(np.float64)


def ranked_order(keys: np.ndarray, uids: np.ndarray) -> np.ndarray:
    """Row indices by key descending, then uid ascending."""
    return np.lexsort((uids, ~keys))  # the last key sorts first; ~ reverses unsigned order


def table_cutoff(scores: np.ndarray, uids: list[str] | np.ndarray, n_keep: int) -> Cutoff:
    """The cutoff that keeps the best `n_keep` scored rows of this table (NaN rows are never kept)."""
    valid = np.flatnonzero(~np.isnan(scores))
    if n_keep <= 0 or len(valid) == 0:
        return KEEP_NONE
    keys = order_keys(scores[valid])
    names = np.asarray(uids, dtype=object)[valid].astype(str)
    last = ranked_order(keys, names)[min(n_keep, len(valid)) - 1]
    return Cutoff(int(keys[last]), str(names[last]))


def cutoff_mask(scores: np.ndarray, uids: list[str] | np.ndarray, cutoff: Cutoff) -> np.ndarray:
    """Rows ranked at or above the cutoff: a higher score, or the same score and a uid not after it."""
    keep = np.zeros(len(scores), bool)
    valid = np.flatnonzero(~np.isnan(scores))
    if cutoff.key is None or len(valid) == 0:
        return keep
    keys = order_keys(scores[valid])
    above = keys > np.uint64(cutoff.key)
    tied = np.flatnonzero(keys == np.uint64(cutoff.key))
    if len(tied):
        names = np.asarray(uids, dtype=object)[valid[tied]].astype(str)
        above[tied] = names <= cutoff.uid
    keep[valid] = above
    return keep


def top_fraction_mask(scores: np.ndarray, uids: list[str], fraction: float) -> tuple[np.ndarray, float]:
    """(keep mask, score of the last kept sample) for the best `fraction` of rows."""
    cutoff = table_cutoff(scores, uids, int(round(fraction * len(scores))))
    return cutoff_mask(scores, uids, cutoff), cutoff.score


def n_kept(params: RankParams, rows: int) -> int:
    """How many rows a top-fraction step keeps of a pool of `rows` usable rows (NaN scores included)."""
    return int(round(params.top_fraction * rows))


def signed_scores(table: pa.Table, params: RankParams) -> np.ndarray:
    """The ranked column, negated when lower is better, so that higher always ranks first."""
    sign = 1.0 if params.better == "higher" else -1.0
    return sign * column_numpy(table, params.score_column)


def pooled(params: RankParams) -> bool:
    """A top fraction is of the whole pool: a shard needs the pool's cutoff to decide its rows."""
    return params.top_fraction is not None


def rank_mask(
    scores: np.ndarray, uids: list[str], params: RankParams, cutoff: Cutoff | None = None
) -> tuple[np.ndarray, float]:
    """(keep mask, threshold applied). Lower-is-better scores are ranked as their negation. A top
    fraction uses `cutoff` when given (the pool's, found shard by shard), else this table's own."""
    sign = 1.0 if params.better == "higher" else -1.0
    if params.top_fraction is not None:
        signed = sign * scores
        if cutoff is None:
            cutoff = table_cutoff(signed, uids, n_kept(params, len(scores)))
        return cutoff_mask(signed, uids, cutoff), sign * cutoff.score
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(sign * scores, nan=-np.inf) >= sign * params.threshold, float(params.threshold)


def needs(params: RankParams) -> tuple[str, ...]:
    return (params.score_column,)


def apply(table: pa.Table, params: RankParams, pool: Cutoff | None = None) -> FilterResult:
    """Dropped rows carry the filter's name (`clip_score`, `dfn`) or, for `rank`, the column's.
    A shard passes the pool's cutoff as `pool`."""
    scores = column_numpy(table, params.score_column)
    uids = table.column("uid").to_pylist()
    keep, threshold = rank_mask(scores, uids, params, pool)
    reason = params.score_column if params.name == "rank" else params.name
    return from_mask(uids, keep, reason, scores=scores, threshold=threshold)
