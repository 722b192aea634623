"""Ingest: download url/caption tables into webdataset shards with img2dataset.

The table is read and split into shard-sized parts by Ray tasks (`stages.source_parts`); each
part is downloaded by img2dataset's own `Downloader` (its HTTP, retry, resize and stats code) and
written by a writer that keys every sample by its stable `uid`. A part is finished once img2dataset
has written its stats file, which is what makes reruns skip finished shards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.atomic import Partial, write_parquet
from pipeline.budget import human_bytes, storage_estimate
from pipeline.manifest import Manifest, count_reasons, merge_reasons
from pipeline.mapping import MapFn, local_map
from pipeline.models import StrictModel
from pipeline.stage import PlanRow, RunContext, Shards, SourceOutputs, Stage
from stages.metadata_schema import RESERVED, SchemaName
from stages.shards import SHARD_DIGITS, shard_name, successful_rows, write_sorted_by_key
from stages.source_parts import Piece, SourcePlan, piece_rows, plan_source, write_arrow
from stages.source_table import SourceTableError, metadata_columns

PART_COLUMNS = ("uid", "url", "caption")
SOURCE_DIR = "source"  # the table as normalised chunks while the stage runs (stages.source_parts)
POOL_COLUMNS = ("uid", "caption", "original_width", "original_height")  # per downloaded sample, for filters
# Resizer messages that mean "this image does not meet the recipe's size rules": a policy drop,
# not a failure of the download itself.
POLICY_REASONS = {
    "image too small": "too_small",
    "aspect ratio too large": "aspect_ratio",
    "image area too large": "too_large",
}


class DownloadConfig(StrictModel):
    """img2dataset options exposed to recipes (names follow img2dataset where they exist)."""

    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float | None = Field(None, gt=0, description="None: no limit")
    samples_per_shard: int = Field(10_000, gt=0)
    thread_count: int = Field(64, gt=0)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0)
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    compute_hash: Literal["md5", "sha256", "sha512"] | None = "sha256"
    extract_exif: bool = False


@dataclass(frozen=True)
class DownloadPart:
    """One shard's worth of input rows, downloaded by one task that first builds them from its pieces."""

    index: int
    input_path: str
    shards_dir: str
    n_rows: int
    columns: tuple[str, ...] = PART_COLUMNS  # uid, url, caption, then the table's metadata columns
    pieces: tuple[Piece, ...] = ()  # kept rows of the source's chunks (stages.source_parts)
    work_dir: str = ""  # where those chunks are


@dataclass
class PartResult:
    index: int
    n_in: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False


def classify_failure(status: str | None, error: str | None) -> str | None:
    """Map img2dataset's (status, error_message) to a short reason; None for a success."""
    if status == "success":
        return None
    message = (error or "").strip()
    lowered = message.lower()
    if status == "failed_to_resize":
        if message in POLICY_REASONS:
            return POLICY_REASONS[message]
        return "decode_error"
    if lowered.startswith("http error"):
        code = message.split(":")[0].split()[-1]
        return f"http_{code}"
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if "unknown url type" in lowered or "no host given" in lowered or "invalid url" in lowered:
        return "invalid_url"
    if "x-robots-tag" in lowered:
        return "disallowed_by_robots"
    if "hash mismatch" in lowered:
        return "hash_mismatch"
    if "connection" in lowered or "urlopen error" in lowered or "remote end closed" in lowered:
        return "connection_error"
    return "download_error"


def is_policy_drop(reason: str) -> bool:
    return reason in POLICY_REASONS.values()


def _writer_class():
    """Build the uid-keyed writer lazily: importing img2dataset pulls in heavy modules."""
    from img2dataset.writer import WebDatasetSampleWriter

    class UidKeyedWebDatasetWriter(WebDatasetSampleWriter):
        """img2dataset's webdataset writer, keyed by uid, with a `reason` column, and all-or-nothing:
        the tar and parquet are written in a `.partial` folder and moved into place on close."""

        def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
            schema = schema.append(pa.field("reason", pa.string()))
            self.final_dir = Path(output_folder)
            self.staging = Partial(self.final_dir / f"{shard_name(shard_id)}.staging", folder=True)
            super().__init__(shard_id, str(self.staging.tmp), save_caption, oom_shard_count, schema, encode_format)

        def write(self, img_str, key, caption, meta):
            meta["key"] = meta["uid"]
            meta["reason"] = classify_failure(meta.get("status"), meta.get("error_message"))
            super().write(img_str, meta["uid"], caption, meta)

        def close(self):
            """Publish the shard with its samples (and parquet rows) in uid order: img2dataset writes
            them in the order its threads finish, which would make every later stage depend on timing."""
            super().close()
            name = shard_name(self.shard_id)
            write_sorted_by_key(self.staging.tmp / f"{name}.tar", self.final_dir / f"{name}.tar")
            rows = pq.read_table(self.staging.tmp / f"{name}.parquet")
            write_parquet(self.final_dir / f"{name}.parquet", rows.sort_by("uid"))  # last: shards are listed by it
            self.staging.abort()  # the staging folder and the unsorted copies

    return UidKeyedWebDatasetWriter


def _build_downloader(config: DownloadConfig, shards_dir: str, columns: tuple[str, ...] = PART_COLUMNS):
    # img2dataset imports wandb (keep it off) and albumentations (which otherwise asks PyPI for updates)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    resizer = Resizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.encode_quality,
        encode_format=config.encode_format,
        min_image_size=config.min_image_size,
        max_aspect_ratio=config.max_aspect_ratio or math.inf,
    )
    return Downloader(
        sample_writer_class=_writer_class(),
        resizer=resizer,
        thread_count=config.thread_count,
        save_caption=True,
        extract_exif=config.extract_exif,
        output_folder=shards_dir,
        column_list=list(columns),  # all of them reach the shard's parquet and each sample's json
        timeout=config.timeout,
        number_sample_per_shard=config.samples_per_shard,
        oom_shard_count=SHARD_DIGITS,
        compute_hash=config.compute_hash,
        verify_hash_type=None,
        encode_format=config.encode_format,
        retries=config.retries,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=config.disallowed_header_directives,
    )


def stats_path(shards_dir: str | Path, index: int) -> Path:
    return Path(shards_dir) / f"{shard_name(index)}_stats.json"


def summarize_part(part: DownloadPart, part_uids: list[str], seconds: float, skipped: bool) -> PartResult:
    """Count the part's outcomes from its parquet, cross-checked with img2dataset's stats."""
    parquet_path = Path(part.shards_dir) / f"{shard_name(part.index)}.parquet"
    table = pq.read_table(parquet_path, columns=["uid", "status", "reason"])
    stats = json.loads(stats_path(part.shards_dir, part.index).read_text())
    statuses = table.column("status").to_pylist()
    kept = statuses.count("success")
    reasons = [r for r in table.column("reason").to_pylist() if r is not None]
    dropped = count_reasons([r for r in reasons if is_policy_drop(r)])
    failed = count_reasons([r for r in reasons if not is_policy_drop(r)])
    # img2dataset drops a sample without a parquet row if its writer raises: count those as lost.
    missing = set(part_uids) - set(table.column("uid").to_pylist())
    if missing:
        failed = merge_reasons(failed, {"lost_in_downloader": len(missing)})
    if stats["successes"] != kept:
        raise RuntimeError(
            f"shard {shard_name(part.index)}: parquet says {kept} successes, img2dataset stats say {stats['successes']}"
        )
    return PartResult(part.index, part.n_rows, kept, dropped, failed, seconds, skipped)


def part_finished(shards_dir: str | Path, index: int) -> bool:
    """img2dataset writes the stats file last (after our writer moved the tar and parquet into place),
    but not atomically: a part counts as finished only when its stats file is whole."""
    try:
        return "successes" in json.loads(stats_path(shards_dir, index).read_text())
    except (OSError, ValueError):
        return False


def download_part(part: DownloadPart, config: DownloadConfig) -> PartResult:
    """Download one part unless its shard is already complete."""
    rows = piece_rows(part.work_dir, part.pieces, part.columns)
    if part_finished(part.shards_dir, part.index):  # an earlier run's: counted again, rows lost included
        return summarize_part(part, rows.column("uid").to_pylist(), 0.0, skipped=True)
    started = time.perf_counter()
    write_arrow(rows, Path(part.input_path))
    downloader = _build_downloader(config, part.shards_dir, part.columns)
    downloader.download_shard((part.index, part.input_path))  # raises on failure: task retries
    return summarize_part(part, rows.column("uid").to_pylist(), time.perf_counter() - started, skipped=False)


def plan_parts(plan: SourcePlan, stage_dir: Path) -> list[DownloadPart]:
    """One part per planned group of source rows; each task writes its own input."""
    shards_dir = stage_dir / "shards"
    inputs_dir = stage_dir / "part_inputs"
    shards_dir.mkdir(parents=True, exist_ok=True)
    inputs_dir.mkdir(parents=True, exist_ok=True)
    return [
        DownloadPart(
            index,
            str(inputs_dir / f"{shard_name(index)}.arrow"),
            str(shards_dir),
            sum(p.stop - p.start for p in pieces),
            plan.columns,
            pieces,
            plan.work_dir,
        )
        for index, pieces in enumerate(plan.parts)
    ]


def run_download(
    source_path: str,
    config: DownloadConfig,
    stage_dir: Path,
    metadata: SchemaName = "auto",
    url_col: str | None = None,
    caption_col: str | None = None,
    map_fn: MapFn = local_map,
) -> Manifest:
    """Download every row of the source table into `stage_dir/shards`; return the manifest."""
    started = time.perf_counter()
    existed = stage_dir.exists()
    try:
        source = plan_source(
            source_path, metadata, url_col, caption_col, stage_dir / SOURCE_DIR, config.samples_per_shard, map_fn
        )
    except SourceTableError:
        if not existed:  # a table that cannot be used leaves nothing behind
            shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    n_in, n_duplicate_rows = source.n_in, source.duplicate_rows
    parts = plan_parts(source, stage_dir)

    def download_shard(part: DownloadPart) -> PartResult:  # named: Ray's dashboard shows tasks by function name
        return download_part(part, config)

    results = map_fn(download_shard, parts, desc="download", weight=lambda r: r.n_in)
    shutil.rmtree(source.work_dir, ignore_errors=True)  # the table's normalised copy: every part is written
    dropped = merge_reasons(*(r.dropped for r in results))
    if n_duplicate_rows:
        dropped = merge_reasons(dropped, {"duplicate_row": n_duplicate_rows})
    seconds = time.perf_counter() - started
    kept = sum(r.kept for r in results)
    downloaded = sum(r.n_in for r in results if not r.skipped)
    download_seconds = sum(r.seconds for r in results if not r.skipped)
    shards = [str(Path(p.shards_dir) / f"{shard_name(p.index)}.tar") for p in parts]
    return Manifest(
        stage="download",
        **{"in": n_in},
        kept=kept,
        dropped=dropped,
        failed=merge_reasons(*(r.failed for r in results)),
        outputs=DownloadOutputs(
            shards_dir=str(stage_dir / "shards"),
            shards=_brace_pattern(stage_dir / "shards", len(parts)),
            n_shards=str(len(shards)),
        ).as_dict(),
        seconds=seconds,
        metrics={
            "samples_per_second": n_in / seconds if seconds > 0 else 0.0,
            "parts_skipped": float(sum(r.skipped for r in results)),
            "task_seconds": download_seconds,
            "rows_downloaded": float(downloaded),
        },
    )


def _brace_pattern(shards_dir: Path, n: int) -> str:
    """webdataset/open_clip style shard list, e.g. dir/{00000..00003}.tar."""
    if n == 1:
        return str(shards_dir / f"{shard_name(0)}.tar")
    return str(shards_dir / f"{{{shard_name(0)}..{shard_name(n - 1)}}}.tar")


def downloaded_rows(shards_dir: Path, stems: list[str] | None = None) -> pa.Table:
    """uid, caption and original size of every successfully downloaded sample (of the shards `stems`
    names, default all), then the metadata columns the source table carried (LAION's `punsafe`,
    DataComp's `clip_l14_similarity_score`, ...)."""
    shards_dir = Path(shards_dir)
    paths = sorted(shards_dir.glob("*.parquet")) if stems is None else [shards_dir / f"{s}.parquet" for s in stems]
    if not paths:
        return pa.table(
            {name: pa.array([], pa.string() if name in POOL_COLUMNS[:2] else pa.int64()) for name in POOL_COLUMNS}
        )
    table = successful_rows(paths)
    for name in POOL_COLUMNS[2:]:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.int64()))
    carried = [c for c in table.column_names if c not in POOL_COLUMNS and c not in RESERVED]
    return table.select([*POOL_COLUMNS, *carried])


class DownloadOutputs(Shards):
    shards: str  # the tars as one brace pattern, as webdataset and open_clip's --train-data take them


@dataclass
class DownloadInputs:
    source: SourceOutputs


class Download(Stage):
    name = "download"
    summary = "img2dataset on Ray into uid-keyed webdataset shards"
    config_model = DownloadConfig
    Inputs = DownloadInputs
    Outputs = DownloadOutputs
    counts_from = "source"

    def columns(self, before: list[Stage]) -> tuple[str, ...]:
        source = self.recipe.source
        if not source.path:  # a source stage's table (the demo's): url and caption only
            return POOL_COLUMNS
        return (*POOL_COLUMNS, *metadata_columns(source.path, source.metadata, source.url_col, source.caption_col))

    def storage(self, rows: int) -> dict[str, float]:
        estimate = storage_estimate(rows, self.config.image_size, None)
        return {"shards": estimate.shards, "metadata": estimate.metadata}

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        source = self.recipe.source.path or f"the '{self.recipe.source.kind}' source's table"
        note = ""
        if rows:
            shards = math.ceil(rows / self.config.samples_per_shard)
            note = (
                f"{shards:,} shards of {self.config.samples_per_shard:,}, ~{human_bytes(self.storage(rows)['shards'])}"
            )
        return PlanRow(self.name, str(source), str(run_dir / self.name / "shards"), rows, note, "1 CPU per shard task")

    def run(self, ctx: RunContext, inputs: DownloadInputs) -> tuple[DownloadOutputs, Manifest]:
        source = inputs.source
        manifest = run_download(
            source.table,
            self.config,
            self.stage_dir(ctx),
            source.metadata,
            source.url_col,
            source.caption_col,
            map_fn=ctx.map_fn,
        )
        return self.finished(manifest)
