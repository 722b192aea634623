"""What every filter returns: a keep mask over the rows of its input table, with reasons."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.manifest import count_reasons


@dataclass
class FilterResult:
    """keep[i] says whether row i survives; reason[i] says why not (None when kept).

    `scores` and `threshold` (when the filter ranks samples) feed the histograms in reports;
    `metrics` are the filter's own figures (cluster counts, removal at other settings), logged as is.
    """

    uids: list[str]
    keep: np.ndarray
    reason: list[str | None]
    scores: np.ndarray | None = None
    threshold: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.uids) == len(self.keep) == len(self.reason)):
            raise ValueError("uids, keep and reason must have one entry per row")

    def reason_counts(self, group=lambda reason: reason) -> dict[str, int]:
        """Dropped rows per reason; `group` folds per-uid reasons (duplicate_of:<uid>) into kinds."""
        return count_reasons([group(r) for r, k in zip(self.reason, self.keep, strict=True) if not k])

    def to_table(self, **extra_columns) -> pa.Table:
        return pa.table({"uid": self.uids, "keep": self.keep, "reason": self.reason, **extra_columns})


def from_mask(uids: list[str], keep: np.ndarray, reason: str, **extra) -> FilterResult:
    """A result where every dropped row has the same reason."""
    keep = np.asarray(keep, bool)
    return FilterResult(uids, keep, [None if k else reason for k in keep.tolist()], **extra)


def column_numpy(table: pa.Table, name: str, dtype=np.float64) -> np.ndarray:
    """A numeric column as numpy, nulls as NaN."""
    return table.column(name).to_numpy(zero_copy_only=False).astype(dtype)


def embedding_matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list column (the embed stage's `image_emb`/`text_emb`) as an (n, d) float32 matrix."""
    array = table.column(column).combine_chunks()
    width = array.type.list_size
    return array.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
