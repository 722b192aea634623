"""What every filter returns: a keep mask over the rows of its input table, with reasons."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from stages.manifest import count_reasons


@dataclass
class FilterResult:
    """keep[i] says whether row i survives; reason[i] says why not (None when kept)."""

    uids: list[str]
    keep: np.ndarray
    reason: list[str | None]

    def __post_init__(self) -> None:
        if not (len(self.uids) == len(self.keep) == len(self.reason)):
            raise ValueError("uids, keep and reason must have one entry per row")

    def reason_counts(self, group=lambda reason: reason) -> dict[str, int]:
        """Dropped rows per reason; `group` folds per-uid reasons (duplicate_of:<uid>) into kinds."""
        return count_reasons([group(r) for r, k in zip(self.reason, self.keep, strict=True) if not k])

    def to_table(self, **extra_columns) -> pa.Table:
        return pa.table({"uid": self.uids, "keep": self.keep, "reason": self.reason, **extra_columns})
