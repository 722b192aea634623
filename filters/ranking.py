"""Keep samples by score: a fixed threshold, or the top fraction of the whole table.

Top-fraction selection ranks globally by (score descending, uid ascending), so the kept set
depends only on the scores, never on how the pool was sharded or ordered. Missing scores (NaN)
are never kept.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from stages.config_base import StrictModel


class RankParams(StrictModel):
    threshold: float | None = Field(None, description="keep scores >= threshold")
    top_fraction: float | None = Field(None, gt=0, le=1, description="keep this fraction of the pool, best first")

    @model_validator(mode="after")
    def _one_rule(self) -> RankParams:
        if (self.threshold is None) == (self.top_fraction is None):
            raise ValueError("set exactly one of threshold or top_fraction")
        return self


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
    """(keep mask, threshold applied)."""
    if params.top_fraction is not None:
        return top_fraction_mask(scores, uids, params.top_fraction)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(scores, nan=-np.inf) >= params.threshold, float(params.threshold)
