"""Dedupe stage: near-duplicate clusters over the whole pool's hash table, plus eval-set leakage.

The matching is global (one index over every hash), so it runs once over the pyarrow table,
not per shard. Its output is a decision per uid, written per shard (`decisions/<shard>.parquet`:
uid, keep, reason, phash), so a later stage reads one shard's decisions without the pool's.
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from filters.phash_dedupe import PhashDedupeParams, phash_dedupe, reason_kind
from pipeline.atomic import atomic_path
from pipeline.manifest import Manifest
from pipeline.stage import Decisions, PlanRow, RunContext, SourceOutputs, Stage
from stages.phash import Phash, PhashOutputs, decode_thumbnail, phash_pixels, read_hash_tables
from stages.shards import image_bytes, read_tar_samples


class DedupeConfig(PhashDedupeParams):
    eval_sets: list[str] = Field(default_factory=list, description="webdataset tars (globs ok) of evaluation images")
    scores_path: str | None = Field(None, description="parquet with uid + score_column, for keep=highest_score")


def hash_eval_sets(paths: list[str]) -> tuple[list[str], np.ndarray]:
    """(keys, uint64 pHashes) of every image in the given evaluation tars."""
    keys, thumbs = [], []
    for pattern in paths:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"evaluation set not found: {pattern}")
        for tar in matches:
            for key, sample in read_tar_samples(tar):
                payload = image_bytes(sample)
                if payload is not None:
                    keys.append(key)
                    thumbs.append(decode_thumbnail(payload)[0])
    hashes = phash_pixels(np.stack(thumbs)) if thumbs else np.zeros(0, np.uint64)
    return keys, hashes


def run_dedupe(hashes_dir: Path, config: DedupeConfig, stage_dir: Path) -> Manifest:
    started = time.perf_counter()
    stems = [p.stem for p in sorted(hashes_dir.glob("*.parquet"))]
    table = read_hash_tables(hashes_dir, with_shard=True)
    if config.scores_path:
        scores = pq.read_table(config.scores_path)
        table = table.join(scores, keys="uid", join_type="left outer").sort_by("uid")
    eval_keys, eval_hashes = hash_eval_sets(config.eval_sets)
    params = PhashDedupeParams(**config.model_dump(include=set(PhashDedupeParams.model_fields)))
    result = phash_dedupe(table, params, eval_keys, eval_hashes)
    stage_dir.mkdir(parents=True, exist_ok=True)
    decisions = write_per_shard(
        stage_dir / DECISIONS, stems, result.to_table(phash=table.column("phash")), table.column("shard")
    )
    seconds = time.perf_counter() - started
    kept = int(result.keep.sum())
    return Manifest(
        stage="dedupe",
        **{"in": table.num_rows},
        kept=kept,
        dropped=result.reason_counts(reason_kind),
        outputs=DedupeOutputs(decisions=str(decisions)).as_dict(),
        seconds=seconds,
        metrics={"eval_images": float(len(eval_keys)), "kept_fraction": kept / max(table.num_rows, 1)},
    )


DECISIONS = "decisions"  # the folder of per-shard decisions


def write_per_shard(folder: Path, stems: list[str], table: pa.Table, shard: pa.ChunkedArray) -> Path:
    """Each shard's rows of `table` (`shard`: row -> index into `stems`) to `folder/<stem>.parquet`,
    in table order; every stem gets a file, an empty one if it has no rows. The folder appears whole."""
    index = shard.to_numpy()
    order = np.argsort(index, kind="stable")
    ends = np.cumsum(np.bincount(index, minlength=len(stems)))
    with atomic_path(folder, folder=True) as tmp:
        for stem, start, stop in zip(stems, np.r_[0, ends[:-1]], ends, strict=True):
            pq.write_table(table.take(order[start:stop]), tmp / f"{stem}.parquet")
    return folder


POOL_COLUMNS = {"keep": "dedupe_keep", "reason": "dedupe_reason"}  # decisions column -> per-uid table column


class DedupeOutputs(Decisions):
    pass


@dataclass
class DedupeInputs:
    hashes: PhashOutputs
    source: SourceOutputs | None = None  # its held-out set, if it has one, is always protected


class Dedupe(Stage):
    name = "dedupe"
    summary = "near-duplicate clusters and eval-set leakage over all hashes"
    config_model = DedupeConfig
    Inputs = DedupeInputs
    Outputs = DedupeOutputs
    counts_from = "hashes"

    def columns(self, before: list[Stage]) -> tuple[str, ...]:
        return tuple(POOL_COLUMNS.values())

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        c = self.config
        evals = f"{len(c.eval_sets)} eval set(s) + the source's held-out set, if any"
        note = f"Hamming <= {c.max_distance}, keep {c.keep}, {evals}"
        output = str(run_dir / self.name / DECISIONS)
        return PlanRow(self.name, str(run_dir / Phash.name / "hashes"), output, rows, note, "driver, one index")

    def run(self, ctx: RunContext, inputs: DedupeInputs) -> tuple[DedupeOutputs, Manifest]:
        config = self.config
        if inputs.source is not None and inputs.source.eval_dir:  # never train on copies of test images
            held_out = str(Path(inputs.source.eval_dir) / "*.tar")
            config = config.model_copy(update={"eval_sets": [*config.eval_sets, held_out]})
        manifest = run_dedupe(Path(inputs.hashes.hashes_dir), config, self.stage_dir(ctx))
        return self.finished(manifest)
