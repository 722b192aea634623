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


def top_fraction_mask(scores: np.ndarray, uids: list[str], fraction: float) -> tuple[np.ndarray, float]:
    """(keep mask, score of the last kept sample) for the best `fraction` of rows."""
    valid = np.flatnonzero(~np.isnan(scores))
    n_keep = int(round(fraction * len(scores)))
    keep = np.zeros(len(scores), bool)
    if n_keep == 0 or len(valid) == 0:
        return keep, float("inf")
    uid_rank = np.argsort(np.argsort(np.asarray(uids, dtype=object)[valid].astype(str)))
    order = valid[np.lexsort((uid_rank, -scores[valid]))]  # last key sorts first: score desc, then uid
    chosen = order[:n_keep]
    keep[chosen] = True
    return keep, float(scores[chosen[-1]])


def rank_mask(scores: np.ndarray, uids: list[str], params: RankParams) -> tuple[np.ndarray, float]:
    """(keep mask, threshold applied). Lower-is-better scores are ranked as their negation."""
    sign = 1.0 if params.better == "higher" else -1.0
    if params.top_fraction is not None:
        keep, last = top_fraction_mask(sign * scores, uids, params.top_fraction)
        return keep, sign * last
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(sign * scores, nan=-np.inf) >= sign * params.threshold, float(params.threshold)


def needs(params: RankParams) -> tuple[str, ...]:
    return (params.score_column,)


def apply(table: pa.Table, params: RankParams) -> FilterResult:
    """Dropped rows carry the filter's name (`clip_score`, `dfn`) or, for `rank`, the column's."""
    scores = column_numpy(table, params.score_column)
    uids = table.column("uid").to_pylist()
    keep, threshold = rank_mask(scores, uids, params)
    reason = params.score_column if params.name == "rank" else params.name
    return from_mask(uids, keep, reason, scores=scores, threshold=threshold)
