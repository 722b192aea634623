"""NSFW filter: drop images whose NSFW probability is at or above a threshold.

Two backends. `onnx` reads `nsfw_onnx`, Yahoo's open_nsfw classifier run on the images by the
embed stage (`embed.nsfw_onnx: true`); it is the right default for real photographs. `head`
scores the CLIP image embedding with a small binary head fitted on labelled examples (the
`heads` stage), which is what catches the demo's synthetic "hazard" class.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from filters.base import FilterResult, column_numpy, embedding_matrix, from_mask
from filters.heads import load_head, score_head
from pipeline.models import StrictModel


class NsfwParams(StrictModel):
    name: Literal["nsfw"] = "nsfw"
    backend: Literal["onnx", "head"] = "onnx"
    head: str | None = Field(None, description="binary head weights for backend=head; default: the run's nsfw head")
    threshold: float = Field(0.5, gt=0, le=1, description="drop when P(nsfw) >= threshold")


def needs(params: NsfwParams) -> tuple[str, ...]:
    return ("nsfw_onnx",) if params.backend == "onnx" else ("image_emb",)


def apply(table: pa.Table, params: NsfwParams) -> FilterResult:
    if params.backend == "onnx":
        scores = column_numpy(table, "nsfw_onnx")
    else:
        if not params.head:
            raise ValueError("nsfw filter with backend=head needs a head: set head=<path> or run the 'heads' stage")
        head, info = load_head(params.head, "binary")
        scores = score_head(head, info, embedding_matrix(table, "image_emb"))
    keep = ~(np.nan_to_num(scores, nan=1.0) >= params.threshold)
    return from_mask(table.column("uid").to_pylist(), keep, "nsfw", scores=scores, threshold=params.threshold)
