"""The dedupe stage's decisions as a strategy step, so strategies can include or leave out dedupe."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa

from filters.base import FilterResult
from filters.phash_dedupe import reason_kind
from pipeline.models import StrictModel

NEEDS = ("dedupe_keep",)


class DedupeParams(StrictModel):
    name: Literal["dedupe"] = "dedupe"


def apply(table: pa.Table, params: DedupeParams) -> FilterResult:
    keep = table.column("dedupe_keep").fill_null(True).to_numpy(zero_copy_only=False).astype(bool)
    reasons = table.column("dedupe_reason").to_pylist()
    return FilterResult(
        table.column("uid").to_pylist(),
        keep,
        [None if k else reason_kind(r) for k, r in zip(keep, reasons, strict=True)],
    )
