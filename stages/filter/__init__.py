"""filter stage: run a strategy (an intersection of named filters) over the per-uid pool table.

Input samples are the downloaded ones. Samples an earlier stage could not decode are failed
with that stage's reason; every other sample is kept or dropped with the first filter that
rejected it. `decisions.parquet` keeps the verdict of every step and every score, so a subset,
a report or a later strategy can be explained sample by sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from filters.registry import Strategy
from filters.strategy import StrategyResult, apply_strategy
from filters.uid_list import UidListError, to_datacomp
from pipeline.atomic import write_parquet, write_with
from pipeline.manifest import Manifest, count_reasons
from pipeline.mapping import MapFn, local_map
from pipeline.models import StrictModel
from pipeline.stage import (
    Decisions,
    PlanRow,
    RunContext,
    SourceOutputs,
    Stage,
    earlier_source,
    input_slots,
    producer,
)
from stages.dedupe import DedupeOutputs
from stages.download import DownloadOutputs
from stages.embed import Embed, EmbedOutputs
from stages.evaluate import eval_classnames
from stages.filter.pool_table import build_pool_table, upstream_failure
from stages.filter.report import write_report
from stages.filter.strategy_inputs import check_columns, check_files, check_heads, resolve_strategy
from stages.heads import Heads, HeadsOutputs
from stages.phash import PhashOutputs


class FilterConfig(StrictModel):
    strategy: Strategy = Field(default_factory=list, description="filters, all of which must keep a sample")
    examples: int = Field(6, ge=0, le=64, description="kept and dropped example images per filter in the report")


KEPT_UIDS = "kept_uids.npy"


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
    pool: pa.Table, config: FilterConfig, stage_dir: Path, map_fn: MapFn = local_map, stage: str = "filter"
) -> tuple[Manifest, StrategyResult]:
    """Apply the strategy to the pool table; write decisions.parquet and kept_uids.npy (DataComp's
    uid-list format) to `stage_dir`. `stage` names the manifest (the prefilter runs this too)."""
    started = time.perf_counter()
    failure = upstream_failure(pool)
    usable = pool.filter(pa.array([f is None for f in failure]))
    result = apply_strategy(usable, config.strategy, map_fn)
    stage_dir.mkdir(parents=True, exist_ok=True)
    decisions = decisions_table(pool, failure, result)
    path = stage_dir / "decisions.parquet"
    write_parquet(path, decisions)
    kept_uids = _write_kept_uids(stage_dir / KEPT_UIDS, decisions)
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
        stage=stage,
        **{"in": pool.num_rows},
        kept=kept,
        dropped=count_reasons([r for r, k in zip(result.reason, result.keep, strict=True) if not k]),
        failed=count_reasons([f for f in failure if f]),
        outputs=FilterOutputs(decisions=str(path), kept_uids=kept_uids).as_dict(),
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )
    return manifest, result


def _write_kept_uids(path: Path, decisions: pa.Table) -> str | None:
    """The kept uids in DataComp's `.npy` format, for its resharder and evaluation (None when the
    uids are not DataComp's 32-digit hex, e.g. a table's own uids of another shape)."""
    kept = decisions.filter(decisions.column("keep")).column("uid")
    try:
        pairs = to_datacomp(kept)
    except UidListError:
        return None
    write_with(path, lambda tmp: np.save(tmp.open("wb"), pairs))
    return str(path)


class FilterOutputs(Decisions):
    kept_uids: str | None = None  # DataComp's uid-list format (filters.uid_list): feeds its resharder


@dataclass
class FilterInputs:
    shards: DownloadOutputs
    hashes: PhashOutputs | None = None
    dedupe: DedupeOutputs | None = None
    embed: EmbedOutputs | None = None
    heads: HeadsOutputs | None = None  # default heads of the aesthetic and nsfw filters
    source: SourceOutputs | None = None  # its held-out class names: default vocabulary and targets


def _step_text(params) -> str:
    fields = {k: v for k, v in params.model_dump().items() if k != "name" and v is not None}
    return f"{params.name}({', '.join(f'{k}={v}' for k, v in fields.items())})"


class Filter(Stage):
    name = "filter"
    summary = "apply the filter strategy to the per-uid pool table"
    config_model = FilterConfig
    Inputs = FilterInputs
    Outputs = FilterOutputs
    counts_from = "shards"

    def check(self, before: list[Stage]) -> None:
        """Every filter of the strategy can run: its columns will exist, its files and heads load."""
        steps = self.config.strategy
        feeding = [p for p in (producer(slot, before) for slot in input_slots(Filter)) if p is not None]
        columns = [column for stage in feeding for column in stage.columns(before[: before.index(stage)])]
        hints = {k: v for stage in self._all_stages() for k, v in stage.column_hints().items()}
        check_columns(steps, columns, hints)
        source = earlier_source(before)
        has_classes = bool(self.recipe.evaluate.eval_dir) or bool(source and source.gives_eval_set)
        embed = next((s for s in before if isinstance(s, Embed)), None)
        check_files(steps, has_classes, embed is not None)
        width = embed.width(before[: before.index(embed)]) if embed else None
        model_name = embed.config.model_name if embed and not embed.config.precomputed else None
        check_heads(steps, any(isinstance(s, Heads) for s in before), width, model_name)

    def _all_stages(self) -> list[Stage]:
        from stages.registry import STAGES  # every stage's hints, for columns no earlier stage gives

        return [stage(self.recipe) for stage in STAGES]

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        steps = " ∩ ".join(_step_text(p) for p in self.config.strategy) or "(keep all)"
        output = str(run_dir / self.name / "decisions.parquet")
        return PlanRow(self.name, "per-uid pool table", output, rows, steps, "driver + Ray tasks for k-means")

    def run(self, ctx: RunContext, inputs: FilterInputs) -> tuple[FilterOutputs, Manifest]:
        shards_dir = Path(inputs.shards.shards_dir)
        pool = build_pool_table(
            shards_dir,
            hashes_dir=Path(inputs.hashes.hashes_dir) if inputs.hashes else None,
            decisions_path=Path(inputs.dedupe.decisions) if inputs.dedupe else None,
            embeddings_dir=Path(inputs.embed.embeddings_dir) if inputs.embed else None,
        )
        heads = inputs.heads.model_dump(exclude={"artifacts"}) if inputs.heads else {}  # filter name -> head
        classnames = eval_classnames(self.recipe.evaluate.eval_dir, inputs.source)
        targets = inputs.embed.class_embeddings if inputs.embed else None
        steps = resolve_strategy(self.config.strategy, heads, classnames, targets)
        config = self.config.model_copy(update={"strategy": steps})
        stage_dir = self.stage_dir(ctx)
        manifest, result = run_filter(pool, config, stage_dir, ctx.map_fn)
        captions = dict(zip(pool.column("uid").to_pylist(), pool.column("caption").to_pylist(), strict=True))
        tars = sorted(shards_dir.glob("*.tar"))
        report = write_report(result, captions, tars, config.examples, stage_dir / "report")
        outputs = FilterOutputs.model_validate(manifest.outputs).model_copy(update={"artifacts": str(report)})
        manifest.outputs = outputs.as_dict()
        return outputs, manifest
