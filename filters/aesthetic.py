"""Aesthetic filter: a LAION-style MLP head rates each image embedding; keep ratings >= threshold.

LAION-Aesthetics keeps images rated 5 or more (its "5+" subsets) on a 1-10 scale. The head is a
local file: LAION's own predictor for the matching CLIP width, or one fitted by the `heads`
stage on a labelled (uid, rating) table.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from filters.base import FilterResult, embedding_matrix, from_mask
from filters.heads import load_head, score_head
from pipeline.models import StrictModel

NEEDS = ("image_emb",)


class AestheticParams(StrictModel):
    name: Literal["aesthetic"] = "aesthetic"
    head: str | None = Field(None, description="head weights (.pt); default: the run's fitted aesthetic head")
    threshold: float = Field(5.0, ge=0, le=10, description="keep ratings >= threshold (1-10 scale)")


def apply(table: pa.Table, params: AestheticParams) -> FilterResult:
    if not params.head:
        raise ValueError("aesthetic filter needs a head: set head=<path> or run the 'heads' stage")
    head, info = load_head(params.head, "regression")
    scores = score_head(head, info, embedding_matrix(table, "image_emb"))
    return from_mask(
        table.column("uid").to_pylist(),
        scores >= params.threshold,
        "aesthetic",
        scores=scores,
        threshold=params.threshold,
    )
