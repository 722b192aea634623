"""filter stage: run a strategy (an intersection of named filters) over the pool, shard by shard.

Input samples are the downloaded ones. Samples an earlier stage could not decode are failed
with that stage's reason; every other sample is kept or dropped with the first filter that
rejected it. `decisions/<shard>.parquet` keeps the verdict of every step and every score, so a
subset, a report or a later strategy can be explained sample by sample. A task per shard decides
its rows (`sharded`); steps that rank or cluster the whole pool get its figures first
(`pool_figures`), so the verdicts equal those over one table of the whole pool (`run_filter`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from filters.registry import Strategy
from filters.strategy import StrategyResult, apply_strategy
from pipeline.atomic import write_parquet
from pipeline.manifest import Manifest
from pipeline.mapping import MapFn, local_map
from pipeline.models import StrictModel
from pipeline.stage import (
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
from stages.filter.decisions import KEPT_UIDS, FilterOutputs, decisions_table, write_kept_uids
from stages.filter.pool_figures import usable_rows
from stages.filter.pool_table import PoolSources
from stages.filter.report import write_report
from stages.filter.sharded import DECISIONS, filter_manifest, run_sharded, summarise
from stages.filter.strategy_inputs import check_columns, check_files, check_heads, resolve_strategy
from stages.heads import Heads, HeadsOutputs
from stages.phash import PhashOutputs


class FilterConfig(StrictModel):
    strategy: Strategy = Field(default_factory=list, description="filters, all of which must keep a sample")
    examples: int = Field(6, ge=0, le=64, description="kept and dropped example images per filter in the report")


def run_filter(
    pool: pa.Table, config: FilterConfig, stage_dir: Path, map_fn: MapFn = local_map, stage: str = "filter"
) -> tuple[Manifest, StrategyResult]:
    """Apply the strategy to a table held whole (tests' oracle for the sharded filter and prefilter;
    a small table at hand); write decisions.parquet and kept_uids.npy (DataComp's uid-list format) to
    `stage_dir`. `stage` names the manifest."""
    started = time.perf_counter()
    usable, failure = usable_rows(pool)
    result = apply_strategy(usable, config.strategy, map_fn)
    stage_dir.mkdir(parents=True, exist_ok=True)
    decisions = decisions_table(pool, failure, result)
    path = write_parquet(stage_dir / "decisions.parquet", decisions)
    summary = summarise(pool, usable, failure, result, decisions)
    kept_uids = write_kept_uids(stage_dir / KEPT_UIDS, summary.kept_pairs)
    seconds = time.perf_counter() - started
    return filter_manifest([summary], config.strategy, path, kept_uids, seconds, stage), result


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
        output = str(run_dir / self.name / DECISIONS)
        return PlanRow(self.name, "per-shard pool tables", output, rows, steps, "a Ray task per shard")

    def run(self, ctx: RunContext, inputs: FilterInputs) -> tuple[FilterOutputs, Manifest]:
        sources = PoolSources(
            inputs.shards.shards_dir,
            hashes_dir=inputs.hashes.hashes_dir if inputs.hashes else None,
            dedupe_decisions=inputs.dedupe.decisions if inputs.dedupe else None,
            embeddings_dir=inputs.embed.embeddings_dir if inputs.embed else None,
        )
        heads = inputs.heads.model_dump(exclude={"artifacts"}) if inputs.heads else {}  # filter name -> head
        classnames = eval_classnames(self.recipe.evaluate.eval_dir, inputs.source)
        targets = inputs.embed.class_embeddings if inputs.embed else None
        steps = resolve_strategy(self.config.strategy, heads, classnames, targets)
        stage_dir = self.stage_dir(ctx)
        done = run_sharded(sources, steps, stage_dir, ctx.map_fn, self.config.examples)
        tars = sorted(Path(sources.shards_dir).glob("*.tar"))
        report = write_report(done.pictures, done.captions, tars, self.config.examples, stage_dir / "report")
        outputs = FilterOutputs.model_validate(done.manifest.outputs).model_copy(update={"artifacts": str(report)})
        done.manifest.outputs = outputs.as_dict()
        return outputs, done.manifest
