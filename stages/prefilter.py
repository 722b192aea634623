"""Prefilter stage: a strategy on the metadata alone, before any image is fetched.

LAION-A was selected from LAION's parquet files (aesthetic and punsafe scores already in them)
before a single download; DataComp's L/14 CLIP-score baseline needs only the pool's
`clip_l14_similarity_score`. This stage runs the same filters the filter stage runs, on the
source table's rows instead of on downloaded samples: `rank` on any metadata score (with
`better: lower` for `punsafe`/`pwatermark`), `basic` on the caption and the sizes the metadata
claims, `text_based`, `metaclip_balance`, `uid_list`. Only the kept rows go on to download, so
`download.in == prefilter.kept`, and every dropped row has its reason in `decisions.parquet`.

The driver holds the table's metadata columns (no images, no embeddings) for the global steps
(top fractions, MetaCLIP counts): about 100 bytes a row for LAION's columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from filters.registry import Strategy
from pipeline.atomic import atomic_path, write_parquet
from pipeline.manifest import Manifest
from pipeline.models import StrictModel
from pipeline.stage import PlanRow, RunContext, SourceOutputs, Stage
from stages.filter import FilterConfig, FilterOutputs, run_filter
from stages.filter.strategy_inputs import check_columns, check_files
from stages.metadata_schema import NORMALISED, resolve
from stages.source_table import first_file_columns, load_source

ROWS_PER_PART = 1_000_000  # rows per kept-table part: download reads the folder part by part
SIZE_COLUMNS = {"source_width": "original_width", "source_height": "original_height"}  # for `basic`


class PrefilterConfig(StrictModel):
    strategy: Strategy = Field(default_factory=list, description="filters on metadata columns, all must keep a row")


class PrefilterOutputs(SourceOutputs):
    """The kept rows, as the table download reads (already normalised: its uids are kept)."""

    decisions: str  # every source row: uid, keep, reason
    kept_uids: str | None = None  # DataComp's uid-list format


@dataclass
class PrefilterInputs:
    source: SourceOutputs


def pool_of(table: pa.Table) -> pa.Table:
    """The normalised source table as a filter's pool: the metadata's sizes stand in for the
    downloaded image's until there is one (so `basic`'s size rules apply before download)."""
    for claimed, measured in SIZE_COLUMNS.items():
        if claimed in table.column_names and measured not in table.column_names:
            table = table.append_column(measured, table.column(claimed))
    return table


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
        sizes = tuple(SIZE_COLUMNS[c] for c in carried.values() if c in SIZE_COLUMNS)
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
        return PlanRow(self.name, "source table metadata", output, rows, steps, "driver")

    def run(self, ctx: RunContext, inputs: PrefilterInputs) -> tuple[PrefilterOutputs, Manifest]:
        source = inputs.source
        table = load_source(source.table, source.metadata, source.url_col, source.caption_col)
        stage_dir = self.stage_dir(ctx)
        manifest, _ = run_filter(
            pool_of(table), FilterConfig(strategy=self.config.strategy), stage_dir, stage=self.name
        )
        written = FilterOutputs.model_validate(manifest.outputs)
        keep = pq.read_table(written.decisions, columns=["keep"]).column("keep")  # in the table's row order
        kept_dir = _write_parts(table.filter(keep), stage_dir / "kept")
        outputs = PrefilterOutputs(
            table=str(kept_dir),
            metadata=NORMALISED.name,
            labels=source.labels,
            eval_dir=source.eval_dir,
            decisions=written.decisions,
            kept_uids=written.kept_uids,
        )
        manifest.outputs = outputs.as_dict()
        return outputs, manifest


def _write_parts(table: pa.Table, folder: Path) -> Path:
    """The kept rows as parquet parts, written as one folder that appears whole."""
    with atomic_path(folder, folder=True) as tmp:
        for index, start in enumerate(range(0, max(table.num_rows, 1), ROWS_PER_PART)):
            write_parquet(tmp / f"{index:05d}.parquet", table.slice(start, ROWS_PER_PART))
    return folder
