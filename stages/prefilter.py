"""Prefilter stage: a strategy on the metadata alone, before any image is fetched.

LAION-A was selected from LAION's parquet files (aesthetic and punsafe scores already in them)
before a single download; DataComp's L/14 CLIP-score baseline needs only the pool's
`clip_l14_similarity_score`. This stage runs the same filters the filter stage runs, on the
source table's rows instead of on downloaded samples: `rank` on any metadata score (with
`better: lower` for `punsafe`/`pwatermark`), `basic` on the caption and the sizes the metadata
claims, `text_based`, `metaclip_balance`, `uid_list`. Only the kept rows go on to download, so
`download.in == prefilter.kept`, and every dropped row has its reason in `decisions/`.

No process holds the table: a task per chunk (a file, or up to 1M rows of a parquet's row groups)
normalises it into a part; the filter stage's shard-by-shard machinery (`stages.filter.sharded`)
decides the parts, finding the pool's figures (a top fraction's cutoff, MetaCLIP's counts) in
passes that return small results; a task per part writes its kept rows. The driver holds a row
per chunk and per part.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import Field

from filters.registry import Strategy
from pipeline.atomic import atomic_path, write_parquet
from pipeline.manifest import Manifest
from pipeline.mapping import MapFn
from pipeline.models import StrictModel
from pipeline.stage import PlanRow, RunContext, SourceOutputs, Stage
from stages.filter import FilterOutputs
from stages.filter.pool_table import METADATA_SIZES, PoolSources
from stages.filter.sharded import run_sharded
from stages.filter.strategy_inputs import check_columns, check_files
from stages.metadata_schema import NORMALISED, MetadataSchema, resolve
from stages.source_parts import Chunk, normalised_chunk, source_chunks
from stages.source_table import SourceTableError, first_file_columns

POOL = "pool"  # the normalised parts the strategy runs on; removed once the kept rows are written


class PrefilterConfig(StrictModel):
    strategy: Strategy = Field(default_factory=list, description="filters on metadata columns, all must keep a row")


class PrefilterOutputs(SourceOutputs):
    """The kept rows, as the table download reads (already normalised: its uids are kept)."""

    decisions: str  # every source row: uid, keep, reason
    kept_uids: str | None = None  # DataComp's uid-list format


@dataclass
class PrefilterInputs:
    source: SourceOutputs


@dataclass(frozen=True)
class PartJob:
    chunk: Chunk
    layout: MetadataSchema
    out: str


def write_pool_part(job: PartJob) -> tuple[int, str | None]:
    """Read and normalise one chunk into a part: (rows, None), or (0, the one-line error) for a table
    that cannot be used (not raised: a retry would not mend it)."""
    try:
        table = normalised_chunk(job.chunk, job.layout)
    except SourceTableError as err:
        return 0, str(err)
    write_parquet(Path(job.out), table)
    return table.num_rows, None


@dataclass(frozen=True)
class KeepJob:
    part: str
    decisions: str
    out: str


def write_kept_part(job: KeepJob) -> int:
    """The part's kept rows (its decisions are in its row order)."""
    keep = pq.read_table(job.decisions, columns=["keep"]).column("keep")
    kept = pq.read_table(job.part).filter(keep)
    write_parquet(Path(job.out), kept)
    return kept.num_rows


def prefilter_table(source: SourceOutputs, strategy: list, stage_dir: Path, map_fn: MapFn) -> Manifest:
    """Decide every row of the source table part by part; write `decisions/`, `kept/` and
    `kept_uids.npy` under `stage_dir`."""
    try:
        layout = resolve(first_file_columns(source.table), source.metadata, source.url_col, source.caption_col)
    except ValueError as err:
        raise (err if isinstance(err, SourceTableError) else SourceTableError(f"{source.table}: {err}")) from None
    pool = stage_dir / POOL
    shutil.rmtree(pool, ignore_errors=True)  # a stopped run's parts
    try:
        chunks = source_chunks(source.table)
        pool.mkdir(parents=True)
        jobs = [PartJob(c, layout, str(pool / f"{c.index:07d}.parquet")) for c in chunks]
        read = map_fn(write_pool_part, jobs, desc="prefilter: read", weight=lambda r: r[0])
        error = next((e for _, e in read if e), None)
        if error or sum(n for n, _ in read) == 0:
            raise SourceTableError(error or f"{source.table}: the table has no rows")
        manifest = run_sharded(PoolSources(str(pool), table_parts=True), strategy, stage_dir, map_fn).manifest
        decisions = Path(FilterOutputs.model_validate(manifest.outputs).decisions)
        with atomic_path(stage_dir / "kept", folder=True) as kept:
            parts = sorted(pool.glob("*.parquet"))
            keeps = [KeepJob(str(p), str(decisions / p.name), str(kept / p.name)) for p in parts]
            map_fn(write_kept_part, keeps, desc="prefilter: kept rows", weight=lambda n: n)
    finally:
        shutil.rmtree(pool, ignore_errors=True)
    return manifest.model_copy(update={"stage": "prefilter"})


class Prefilter(Stage):
    name = "prefilter"
    summary = "filter the source table on its metadata before download"
    config_model = PrefilterConfig
    Inputs = PrefilterInputs
    Outputs = PrefilterOutputs

    def _source_columns(self) -> tuple[str, ...] | None:
        """The pool's columns, from the table's first file (None while it cannot be read)."""
        source = self.recipe.source
        if not source.path:
            return ("uid", "url", "caption")
        try:
            names = first_file_columns(source.path)
            carried = resolve(names, source.metadata, source.url_col, source.caption_col).carried_names(names)
        except ValueError:
            return None  # a missing table is download's one-line error, or a dry-run's warning
        sizes = tuple(METADATA_SIZES[c] for c in carried.values() if c in METADATA_SIZES)
        return ("uid", "url", "caption", *carried.values(), *sizes)

    def check(self, before: list[Stage]) -> None:
        """Every filter reads only columns the metadata has; image scores say where they come from."""
        hints = {
            "image_emb": "it is computed after download; before download rank a metadata score instead",
            "clip_score": "it is computed after download; before download rank the metadata's similarity",
            "dedupe_keep": "dedupe needs the images; put it in the filter stage",
        }
        columns = self._source_columns()
        if columns is not None:
            check_columns(self.config.strategy, list(columns), hints)
        check_files(self.config.strategy, has_classes=False, has_embeddings=False, key="prefilter.strategy")

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        steps = " ∩ ".join(p.name for p in self.config.strategy) or "(keep all)"
        output = str(run_dir / self.name / "kept")
        return PlanRow(self.name, "source table metadata", output, rows, steps, "Ray tasks: a part per chunk")

    def run(self, ctx: RunContext, inputs: PrefilterInputs) -> tuple[PrefilterOutputs, Manifest]:
        source = inputs.source
        stage_dir = self.stage_dir(ctx)
        manifest = prefilter_table(source, self.config.strategy, stage_dir, ctx.map_fn)
        written = FilterOutputs.model_validate(manifest.outputs)
        outputs = PrefilterOutputs(
            table=str(stage_dir / "kept"),
            metadata=NORMALISED.name,
            labels=source.labels,
            eval_dir=source.eval_dir,
            decisions=written.decisions,
            kept_uids=written.kept_uids,
        )
        manifest.outputs = outputs.as_dict()
        return outputs, manifest
