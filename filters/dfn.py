"""Data Filtering Network filter: CLIP score under a *filtering network*, keep the top fraction.

The filtering network is any CLIP model trained on high-quality pairs (in the DFN paper, a CLIP
trained on curated data); the embed stage scores every pair with it into `dfn_score`.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from filters.base import FilterResult, column_numpy, from_mask
from filters.ranking import RankParams, rank_mask

NEEDS = ("dfn_score",)


class DfnParams(RankParams):
    name: Literal["dfn"] = "dfn"
    top_fraction: float | None = Field(None, gt=0, le=1, description="keep this fraction, best first (DFN: 0.15)")


def apply(table: pa.Table, params: DfnParams) -> FilterResult:
    scores = column_numpy(table, "dfn_score")
    uids = table.column("uid").to_pylist()
    keep, threshold = rank_mask(scores, uids, params)
    return from_mask(uids, keep, "dfn", scores=scores, threshold=threshold)
