"""Basic rules (DataComp's `basic` baseline): caption length and language, image size and shape.

Defaults are DataComp's: more than 2 words and more than 5 characters, English, shorter image
side at least 200 px, aspect ratio at most 3. Image sizes are the originals img2dataset
recorded before resizing. Language comes from py3langid, whose model ships inside the wheel
(nothing is downloaded); it is the first rule to loosen for multilingual pools.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from filters.base import FilterResult, column_numpy
from pipeline.models import StrictModel

NEEDS = ("caption", "original_width", "original_height")


class BasicParams(StrictModel):
    name: Literal["basic"] = "basic"
    min_words: int = Field(3, ge=0, description="caption needs at least this many words (DataComp: > 2)")
    min_chars: int = Field(6, ge=0, description="caption needs at least this many characters (DataComp: > 5)")
    languages: list[str] | None = Field(["en"], description="ISO 639-1 codes to keep; null keeps any language")
    min_image_side: int = Field(200, ge=0, description="shorter original side, px")
    max_aspect_ratio: float | None = Field(3.0, ge=1, description="longer / shorter side; null: any shape")


@cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)  # ships in the wheel


def caption_languages(captions: list[str]) -> list[str]:
    identify = _identifier().classify
    return [identify(c)[0] if c.strip() else "" for c in captions]


def apply(table: pa.Table, params: BasicParams) -> FilterResult:
    captions = [c or "" for c in table.column("caption").to_pylist()]
    n = len(captions)
    words = np.array([len(c.split()) for c in captions])
    chars = np.array([len(c.strip()) for c in captions])
    width = column_numpy(table, "original_width")
    height = column_numpy(table, "original_height")
    short, long = np.fmin(width, height), np.fmax(width, height)
    with np.errstate(invalid="ignore", divide="ignore"):
        aspect = long / short
    rules: list[tuple[str, np.ndarray]] = [
        ("basic:caption_length", (words >= params.min_words) & (chars >= params.min_chars)),
    ]
    if params.languages is not None:
        wanted = set(params.languages)
        rules.append(("basic:language", np.array([lang in wanted for lang in caption_languages(captions)], bool)))
    # sizes unknown (null) pass: the rule cannot judge them, and download already enforced its own minimum
    rules.append(("basic:image_size", np.isnan(short) | (short >= params.min_image_side)))
    if params.max_aspect_ratio is not None:
        rules.append(("basic:aspect_ratio", np.isnan(aspect) | (aspect <= params.max_aspect_ratio)))
    keep = np.ones(n, bool)
    reason: list[str | None] = [None] * n
    for name, passed in rules:
        for i in np.flatnonzero(keep & ~passed):
            reason[i] = name
        keep &= passed
    return FilterResult(table.column("uid").to_pylist(), keep, reason)
