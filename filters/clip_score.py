"""CLIP-score filter (DataComp's baseline): cosine similarity of a pair's image and text embeddings.

Keep pairs above a threshold, or the top fraction of the whole pool (DataComp's `l14_top30`).
The scores come from the embed stage (`clip_score` column), computed once for every filter.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa

from filters.base import FilterResult, column_numpy, from_mask
from filters.ranking import RankParams, rank_mask

NEEDS = ("clip_score",)


class ClipScoreParams(RankParams):
    name: Literal["clip_score"] = "clip_score"


def apply(table: pa.Table, params: ClipScoreParams) -> FilterResult:
    scores = column_numpy(table, "clip_score")
    uids = table.column("uid").to_pylist()
    keep, threshold = rank_mask(scores, uids, params)
    return from_mask(uids, keep, "clip_score", scores=scores, threshold=threshold)
