"""Dedupe stage: near-duplicate clusters over the whole pool's hashes, plus eval-set leakage.

The pairs are global, yet no process holds the pool: a shuffle by band value finds every pair
within the radius in Ray tasks (`shuffle`), the driver joins the pairs into clusters and picks each
cluster's keeper (`clusters`), and a task per shard writes its decisions (`decisions/<shard>.parquet`:
uid, keep, reason, phash). The result equals `filters.phash_dedupe.phash_dedupe` over one table of
the whole pool (tests/test_dedupe_sharded.py). The driver holds the pairs and the uids of the rows
that have a near-duplicate: it grows with the duplicates, not with the pool. A pool that fits one
map task (`map_rows`) is decided in the driver process, where Ray tasks would only add start-up time.
"""

from __future__ import annotations

import glob
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from filters.hamming import exact_bands
from filters.phash_dedupe import PhashDedupeParams, eval_distance
from pipeline.atomic import atomic_path
from pipeline.manifest import Manifest
from pipeline.mapping import MapFn, local_map, shared
from pipeline.stage import Decisions, PlanRow, RunContext, SourceOutputs, Stage
from stages.dedupe.clusters import EvalSet, WriteJob, by_shard, components, local_rows, node_keepers, write_shard
from stages.dedupe.shuffle import HashShard, pool_edges, shuffle_shape
from stages.phash import Phash, PhashOutputs, decode_thumbnail, phash_pixels
from stages.shards import image_bytes, read_tar_samples


class DedupeConfig(PhashDedupeParams):
    eval_sets: list[str] = Field(default_factory=list, description="webdataset tars (globs ok) of evaluation images")
    scores_path: str | None = Field(None, description="parquet with uid + score_column, for keep=highest_score")
    map_rows: int = Field(1_000_000, ge=1, description="hashed rows one shuffle map task reads")
    partition_entries: int = Field(2_000_000, ge=1, description="(band, hash) entries one pair-search task reads")


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


def run_dedupe(hashes_dir: Path, config: DedupeConfig, stage_dir: Path, map_fn: MapFn = local_map) -> Manifest:
    started = time.perf_counter()
    eval_keys, eval_hashes = hash_eval_sets(config.eval_sets)
    manifest = dedupe_pool(hashes_dir, config, stage_dir, map_fn, eval_keys, eval_hashes)
    return manifest.model_copy(update={"seconds": time.perf_counter() - started})


def dedupe_pool(
    hashes_dir: Path,
    config: DedupeConfig,
    stage_dir: Path,
    map_fn: MapFn = local_map,
    eval_keys: list[str] | tuple = (),
    eval_hashes: np.ndarray | None = None,
) -> Manifest:
    """Decide every hashed row of the pool without holding the pool: see `shuffle` and `clusters`."""
    started = time.perf_counter()
    params = PhashDedupeParams(**config.model_dump(include=set(PhashDedupeParams.model_fields)))
    if params.keep == "highest_score" and not (config.scores_path and params.score_column):
        raise ValueError("keep=highest_score needs scores_path (a parquet of uid + score_column) and score_column")
    paths = sorted(hashes_dir.glob("*.parquet"))
    shards = [HashShard(index, str(path)) for index, path in enumerate(paths)]
    eval_hashes = np.zeros(0, np.uint64) if eval_hashes is None else np.asarray(eval_hashes, np.uint64)
    evals = shared(EvalSet(list(eval_keys), eval_hashes, eval_distance(params)))
    shape = shuffle_shape(paths, exact_bands(params.max_distance), config.map_rows, config.partition_entries)
    if shape.shards_per_map >= len(shards) and shape.parts == 1:
        map_fn = local_map  # at most map_rows rows: tasks would add only their start-up time
    scratch = stage_dir / SHUFFLE
    shutil.rmtree(scratch, ignore_errors=True)  # a stopped run's leftovers
    try:
        edges = pool_edges(shards, shape, scratch, params.max_distance, map_fn)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    nodes, labels = components(edges)
    uids, keepers = node_keepers(shards, nodes, labels, params, config.scores_path, evals, map_fn)
    duplicate = (keepers >= 0) & (keepers != np.arange(len(nodes)))
    with atomic_path(stage_dir / DECISIONS, folder=True) as folder:
        jobs = []
        for shard, at in zip(shards, by_shard(nodes, len(shards)), strict=True):
            at = at[duplicate[at]]
            out = str(folder / f"{Path(shard.path).stem}.parquet")
            jobs.append(WriteJob(shard, local_rows(nodes[at]), uids.take(keepers[at]), evals, out))
        counts = map_fn(write_shard, jobs, desc="dedupe: decisions", weight=lambda c: c.rows)
    rows, kept = sum(c.rows for c in counts), sum(c.kept for c in counts)
    return Manifest(
        stage="dedupe",
        **{"in": rows},
        kept=kept,
        dropped=dict(sum((c.dropped for c in counts), Counter())),
        outputs=DedupeOutputs(decisions=str(stage_dir / DECISIONS)).as_dict(),
        seconds=time.perf_counter() - started,
        metrics={
            "eval_images": float(len(eval_keys)),
            "kept_fraction": kept / max(rows, 1),
            "near_duplicate_pairs": float(len(edges)),
            "rows_with_near_duplicates": float(len(nodes)),
            "shuffle_partitions": float(shape.partitions),
        },
    )


DECISIONS = "decisions"  # the folder of per-shard decisions
SHUFFLE = "shuffle"  # the band shuffle's scratch files, removed once the pairs are found


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
        return PlanRow(
            self.name,
            str(run_dir / Phash.name / "hashes"),
            output,
            rows,
            note,
            "Ray tasks: band shuffle, pairs, decisions",
        )

    def run(self, ctx: RunContext, inputs: DedupeInputs) -> tuple[DedupeOutputs, Manifest]:
        config = self.config
        if inputs.source is not None and inputs.source.eval_dir:  # never train on copies of test images
            held_out = str(Path(inputs.source.eval_dir) / "*.tar")
            config = config.model_copy(update={"eval_sets": [*config.eval_sets, held_out]})
        manifest = run_dedupe(Path(inputs.hashes.hashes_dir), config, self.stage_dir(ctx), ctx.map_fn)
        return self.finished(manifest)
