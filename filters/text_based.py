"""Text-based filter (DataComp's `text_based` baseline): keep captions that name a target class.

DataComp matches captions against ImageNet class names. Here the vocabulary is `words` and/or a
word-list file; when neither is given the pipeline fills in the evaluation set's class names.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from filters.base import from_mask
from filters.vocabulary import TermMatcher, load_terms
from pipeline.models import StrictModel

NEEDS = ("caption",)


class TextBasedParams(StrictModel):
    name: Literal["text_based"] = "text_based"
    words: list[str] | None = Field(None, description="class names or words; default: the eval set's class names")
    vocabulary: str | None = Field(None, description="word-list file, one term per line")


def apply(table: pa.Table, params: TextBasedParams):
    terms = load_terms(params.words, params.vocabulary)
    if not terms:
        raise ValueError("text_based: the vocabulary is empty (set words or vocabulary)")
    matcher = TermMatcher(terms)
    captions = [c or "" for c in table.column("caption").to_pylist()]
    keep = np.array([bool(matcher.matches(c)) for c in captions], bool)
    result = from_mask(table.column("uid").to_pylist(), keep, "text_based")
    result.metrics["vocabulary_size"] = float(len(terms))
    return result
