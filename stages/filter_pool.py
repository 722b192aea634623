"""Filter stage: run a strategy (an intersection of named filters) over the per-uid pool table.

Input samples are the downloaded ones. Samples an earlier stage could not decode are failed
with that stage's reason; every other sample is kept or dropped with the first filter that
rejected it. `decisions.parquet` keeps the verdict of every step and every score, so a subset,
a report or a later strategy can be explained sample by sample.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from filters.registry import Strategy
from filters.strategy import StrategyResult, apply_strategy
from pipeline.atomic import write_parquet
from stages.config_base import StrictModel
from stages.manifest import Manifest, count_reasons
from stages.mapping import MapFn, local_map
from stages.pool_table import upstream_failure


class FilterConfig(StrictModel):
    strategy: Strategy = Field(default_factory=list, description="filters, all of which must keep a sample")
    examples: int = Field(6, ge=0, le=64, description="kept and dropped example images per filter in the report")


def decisions_table(pool: pa.Table, failure: list[str | None], result: StrategyResult) -> pa.Table:
    """One row per pool sample: final keep/reason plus each step's keep and score."""
    n = pool.num_rows
    ok_rows = np.flatnonzero([f is None for f in failure])
    keep = np.zeros(n, bool)
    keep[ok_rows] = result.keep
    reason: list[str | None] = [f"failed:{f}" if f else None for f in failure]
    for row, r in zip(ok_rows, result.reason, strict=True):
        reason[row] = r
    columns: dict[str, pa.Array] = {"uid": pool.column("uid"), "keep": pa.array(keep), "reason": pa.array(reason)}
    for index, (_, step) in enumerate(result.steps):
        label = result.step_label(index)
        step_keep = np.zeros(n, bool)
        step_keep[ok_rows] = step.keep
        columns[f"keep_{label}"] = pa.array(step_keep)
        if step.scores is not None:
            scores = np.full(n, np.nan, np.float32)
            scores[ok_rows] = step.scores
            columns[f"score_{label}"] = pa.array(scores)
    return pa.table(columns)


def run_filter(
    pool: pa.Table, config: FilterConfig, stage_dir: Path, map_fn: MapFn = local_map
) -> tuple[Manifest, StrategyResult]:
    started = time.perf_counter()
    failure = upstream_failure(pool)
    usable = pool.filter(pa.array([f is None for f in failure]))
    result = apply_strategy(usable, config.strategy, map_fn)
    stage_dir.mkdir(parents=True, exist_ok=True)
    decisions = decisions_table(pool, failure, result)
    path = stage_dir / "decisions.parquet"
    write_parquet(path, decisions)
    metrics: dict[str, float] = {"kept_fraction": float(result.keep.mean()) if len(result.keep) else 0.0}
    for index, (_, step) in enumerate(result.steps):
        label = result.step_label(index)
        metrics[f"{label}.dropped"] = float((~step.keep).sum())
        metrics[f"{label}.kept_fraction"] = float(step.keep.mean()) if len(step.keep) else 0.0
        if step.threshold is not None and np.isfinite(step.threshold):
            metrics[f"{label}.threshold"] = step.threshold
        metrics.update({f"{label}.{key}": value for key, value in step.metrics.items()})
    kept = int(pc.sum(decisions.column("keep")).as_py() or 0)
    manifest = Manifest(
        stage="filter",
        **{"in": pool.num_rows},
        kept=kept,
        dropped=count_reasons([r for r, k in zip(result.reason, result.keep, strict=True) if not k]),
        failed=count_reasons([f for f in failure if f]),
        outputs={"decisions": str(path)},
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )
    return manifest, result
