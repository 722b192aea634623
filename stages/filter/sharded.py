"""The filter stage shard by shard: one task per shard decides its rows; no process holds the pool.

1. A pass counts each shard's usable rows (those every earlier stage processed).
2. Steps whose verdict needs a figure of the whole pool get it from `pool_figures` (a rank cutoff,
   centroids, entry counts), in passes that return small results.
3. A task per shard builds the shard's per-uid table, applies the strategy with those figures and
   writes `decisions/<shard>.parquet`. It returns counts, a bounded sample of scores for the
   report's histograms and example candidates from the first shards; the driver adds these up.
   Its kept uids go to a file, merged into `kept_uids.npy` by bucket tasks (`kept_uids`).

The result equals `apply_strategy` over the whole pool table, row for row (tests/test_filter_sharded.py,
and the demo in tests/test_filter_pipeline.py). One caveat at scale: float32 products (k-means
assignment, heads' scores) may round differently for a batch of another size, so a row at an exact
near-tie could differ in its last bit between the two ways.
Driver memory: per-shard counts and samples, the figures (at most `clustering.FIT_SAMPLE`
embeddings for image_based and semantic_dedupe's fits) and a count per kept-uid bucket.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from filters.registry import FILTERS
from filters.strategy import StrategyResult, apply_strategy
from pipeline.atomic import atomic_path, write_parquet
from pipeline.manifest import Manifest, merge_reasons
from pipeline.mapping import MapFn, local_map, resolved, shared
from stages.filter.decisions import KEPT_UIDS, FilterOutputs, decisions_table, kept_pairs
from stages.filter.kept_uids import merge_kept_uids
from stages.filter.pool_figures import PerShard, ShardRead, count_usable, piece_for, pool_figures, usable_rows
from stages.filter.pool_table import PoolSources, shard_pool_table
from stages.filter.report import MAX_TARS_SCANNED, StepPicture
from stages.filter.semantic_shuffle import SemanticPiece

DECISIONS = "decisions"  # the folder of per-shard decisions
SHUFFLE = "shuffle"  # scratch: a shuffle's files (semantic_dedupe's), kept-uid parts; removed at the end
KEPT_PARTS = "kept_uids"  # each shard's kept uids, under SHUFFLE
REPORT_ROWS = 100_000  # scores the report's histograms are drawn from, spread over the shards


@dataclass(frozen=True)
class ShardDecide:
    read: ShardRead
    steps: list
    figures: list  # per step: the pool's figure, this shard's piece of it, or None
    out: str
    examples: int  # example candidates per step and verdict (0: this shard is not scanned for examples)
    sample_rows: int  # rows whose scores go to the report
    kept_part: str  # where its kept uids go, as DataComp's sorted pairs


@dataclass
class StepCounts:
    dropped: int = 0
    threshold: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ShardSummary:
    """What one shard's task hands back: counts and small samples, never its rows."""

    rows: int = 0
    usable: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    steps: list[StepCounts] = field(default_factory=list)
    pictures: list[StepPicture] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)
    kept_pairs: np.ndarray | None = None  # None: the uids are not DataComp's shape
    kept_part: str | None = None  # the file a shard's task wrote its kept_pairs to (then not sent back)


def decide_shard(job: ShardDecide) -> ShardSummary:
    table = shard_pool_table(job.read.sources, job.read.stem)
    usable, failure = usable_rows(table)
    figures = [resolved(f) for f in job.figures]
    uids = usable.column("uid").to_pylist() if any(isinstance(f, SemanticPiece) for f in figures) else []
    figures = [f.load(uids) if isinstance(f, SemanticPiece) else f for f in figures]
    result = apply_strategy(usable, job.steps, local_map, figures)
    decisions = decisions_table(table, failure, result)
    write_parquet(Path(job.out), decisions)
    summary = summarise(table, usable, failure, result, decisions, job.examples, job.sample_rows)
    if summary.kept_pairs is not None:
        np.save(job.kept_part, summary.kept_pairs)
        summary.kept_pairs, summary.kept_part = None, job.kept_part
    return summary


def summarise(
    table: pa.Table,
    usable: pa.Table,
    failure: list[str | None],
    result: StrategyResult,
    decisions: pa.Table,
    examples: int = 0,
    sample_rows: int | None = None,
) -> ShardSummary:
    """The counts, samples and kept uids of one table's verdicts (a shard's, or a whole table's)."""
    summary = ShardSummary(table.num_rows, usable.num_rows, int(result.keep.sum()))
    summary.dropped.update(r for r, k in zip(result.reason, result.keep, strict=True) if not k)
    summary.failed.update(f for f in failure if f)
    uids = np.asarray(result.uids, dtype=object)
    for index, (_, step) in enumerate(result.steps):
        summary.steps.append(StepCounts(int((~step.keep).sum()), step.threshold, dict(step.metrics)))
        picture = StepPicture(result.step_label(index), step.threshold)
        if step.scores is not None:
            picture.scores.append(np.asarray(step.scores[:sample_rows], np.float64))
            picture.keep.append(step.keep[:sample_rows])
        picture.kept = list(uids[step.keep][:examples])
        picture.dropped = list(uids[~step.keep][:examples])
        summary.pictures.append(picture)
    wanted = {u for p in summary.pictures for u in (*p.kept, *p.dropped)}
    if wanted:
        captions = usable.column("caption").to_pylist()
        summary.captions = {u: c or "" for u, c in zip(result.uids, captions, strict=True) if u in wanted}
    summary.kept_pairs = kept_pairs(decisions)
    return summary


@dataclass
class ShardedResult:
    manifest: Manifest
    pictures: list[StepPicture]
    captions: dict[str, str]


def run_sharded(
    sources: PoolSources, steps: list, stage_dir: Path, map_fn: MapFn = local_map, examples: int = 0
) -> ShardedResult:
    """Apply the strategy shard by shard; write `decisions/` and `kept_uids.npy` to `stage_dir`."""
    started = time.perf_counter()
    stems = sources.stems()
    reads = [ShardRead(sources, stem, ()) for stem in stems]
    usable = map_fn(count_usable, reads, desc="filter: usable rows") if any(_pooled(steps)) else [0] * len(stems)
    scratch = stage_dir / SHUFFLE
    shutil.rmtree(scratch, ignore_errors=True)  # a stopped run's
    try:
        figures = pool_figures(steps, [ShardRead(sources, s) for s in stems], usable, map_fn, scratch)
        figures = [f if f is None or isinstance(f, PerShard) else shared(f) for f in figures]
        stage_dir.mkdir(parents=True, exist_ok=True)
        sample_rows = max(10, REPORT_ROWS // max(len(stems), 1))
        with atomic_path(stage_dir / DECISIONS, folder=True) as folder:
            jobs = [
                ShardDecide(
                    ShardRead(sources, stem),
                    steps,
                    [piece_for(f, stem) for f in figures],  # a per-shard figure goes to its shard only
                    str(folder / f"{stem}.parquet"),
                    examples if index < MAX_TARS_SCANNED else 0,
                    sample_rows,
                    str(scratch / KEPT_PARTS / f"{stem}.npy"),
                )
                for index, stem in enumerate(stems)
            ]
            (scratch / KEPT_PARTS).mkdir(parents=True, exist_ok=True)
            summaries = map_fn(decide_shard, jobs, desc="filter", weight=lambda s: s.rows)
        (stage_dir / KEPT_UIDS).unlink(missing_ok=True)  # an earlier run's list must not outlive this one
        kept_uids = None
        if all(s.kept_part is not None for s in summaries):  # DataComp-shaped uids only
            parts = [s.kept_part for s in summaries]
            kept_uids = merge_kept_uids(parts, sum(s.kept for s in summaries), stage_dir / KEPT_UIDS, scratch, map_fn)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ShardedResult(
        filter_manifest(summaries, steps, stage_dir / DECISIONS, kept_uids, time.perf_counter() - started),
        _pictures(summaries, steps),
        {u: c for s in summaries for u, c in s.captions.items()},
    )


def _pooled(steps: list) -> list[bool]:
    return [FILTERS[p.name].pooled(p) for p in steps]


def filter_manifest(
    summaries: list[ShardSummary],
    steps: list,
    decisions: Path,
    kept_uids: str | None,
    seconds: float,
    stage: str = "filter",
) -> Manifest:
    """The stage's manifest from its shards' summaries: counts add up; a step's metrics are the
    pool's figures (alike in every shard)."""
    usable = sum(s.usable for s in summaries)
    kept = sum(s.kept for s in summaries)
    metrics: dict[str, float] = {"kept_fraction": kept / usable if usable else 0.0}
    for index, params in enumerate(steps):
        label = f"{index}_{params.name}"
        counted = [s.steps[index] for s in summaries]
        dropped = sum(c.dropped for c in counted)
        metrics[f"{label}.dropped"] = float(dropped)
        metrics[f"{label}.kept_fraction"] = (usable - dropped) / usable if usable else 0.0
        threshold = next((c.threshold for c in counted if c.threshold is not None), None)
        if threshold is not None and np.isfinite(threshold):
            metrics[f"{label}.threshold"] = threshold
        first = next((c.metrics for c in counted if c.metrics), {})  # the pool's figures: alike in every shard
        metrics.update({f"{label}.{key}": value for key, value in first.items()})
    return Manifest(
        stage=stage,
        **{"in": sum(s.rows for s in summaries)},
        kept=kept,
        dropped=merge_reasons(*(s.dropped for s in summaries)),
        failed=merge_reasons(*(s.failed for s in summaries)),
        outputs=FilterOutputs(decisions=str(decisions), kept_uids=kept_uids).as_dict(),
        seconds=seconds,
        metrics=metrics,
    )


def _pictures(summaries: list[ShardSummary], steps: list) -> list[StepPicture]:
    pictures = [StepPicture(f"{i}_{p.name}") for i, p in enumerate(steps)]
    for summary in summaries:
        for whole, part in zip(pictures, summary.pictures, strict=True):
            whole.threshold = part.threshold if part.threshold is not None else whole.threshold
            whole.scores += part.scores
            whole.keep += part.keep
            whole.kept += part.kept
            whole.dropped += part.dropped
    return pictures
