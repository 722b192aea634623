"""A strategy is an intersection of filters: a sample is kept when every step keeps it.

Each step sees the whole table, so a top-fraction step ranks the whole pool, as DataComp's
intersections do (`image_based ∩ clip_score` intersects two independent selections); the kept
set does not depend on the order of the steps. A dropped sample's reason is its first failing
step, and each step's own drop count is kept too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from filters.base import FilterResult
from filters.registry import FILTERS
from pipeline.mapping import MapFn, local_map


class StrategyError(ValueError):
    """A strategy cannot run on this table (e.g. a column its filter needs is missing); one line."""


@dataclass
class StrategyResult:
    uids: list[str]
    keep: np.ndarray
    reason: list[str | None]
    steps: list[tuple[object, FilterResult]]

    def step_label(self, index: int) -> str:
        return f"{index}_{self.steps[index][0].name}"


def missing_columns(table_columns: list[str], steps: list) -> list[tuple[str, str]]:
    """(filter, column) pairs the table lacks."""
    return [(p.name, c) for p in steps for c in FILTERS[p.name].needs(p) if c not in table_columns]


def apply_strategy(
    table: pa.Table, steps: list, map_fn: MapFn = local_map, pools: list | None = None
) -> StrategyResult:
    """`map_fn` runs the chunked work of parallel filters (k-means assignment, per-cluster dedupe).
    `pools` (one per step, None for a step that needs none) are the whole pool's figures when
    `table` is one shard of it; without them each step takes its figures from `table` itself."""
    missing = missing_columns(table.column_names, steps)
    if missing:
        detail = ", ".join(f"'{name}' needs column '{column}'" for name, column in missing)
        raise StrategyError(f"strategy cannot run on this pool: {detail}")
    uids = table.column("uid").to_pylist()
    keep = np.ones(len(uids), bool)
    reason: list[str | None] = [None] * len(uids)
    results = []
    for params, pool in zip(steps, pools or [None] * len(steps), strict=True):
        spec = FILTERS[params.name]
        extra = {"pool": pool} if pool is not None else {}
        result = spec.apply(table, params, map_fn, **extra) if spec.parallel else spec.apply(table, params, **extra)
        for i in np.flatnonzero(keep & ~result.keep):
            reason[i] = result.reason[i]
        keep &= result.keep
        results.append((params, result))
    return StrategyResult(uids, keep, reason, results)
