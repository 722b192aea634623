"""Hash stage: a pHash for every downloaded image, one parquet per shard.

Each shard is one task. Its input samples are the successful rows of the download parquet;
each ends up hashed, or failed as `decode_error` (bytes that do not decode) or `missing_in_tar`
(a truncated or incomplete tar). A shard's table is written atomically, so a rerun skips it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.atomic import write_parquet
from stages.config_base import StrictModel
from stages.manifest import Manifest, count_reasons, merge_reasons
from stages.mapping import MapFn, local_map
from stages.phash import decode_thumbnail, phash_pixels, to_signed
from stages.reshard import read_tar_samples

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("phash", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("reason", pa.string()),
    ]
)


class HashConfig(StrictModel):
    shard_glob: str = Field("*.tar", description="which tars of the shards folder to hash")


@dataclass(frozen=True)
class HashTask:
    tar: str
    output: str


@dataclass
class HashResult:
    n_in: int
    kept: int
    failed: dict[str, int]
    skipped: bool


def image_bytes(sample: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def expected_samples(tar: Path) -> pa.Table:
    """Samples the shard should contain: successful rows of its parquet (all keys if none)."""
    parquet = tar.with_suffix(".parquet")
    if not parquet.exists():
        keys = sorted({key for key, _ in read_tar_samples(tar)})
        return pa.table(
            {
                "uid": keys,
                "original_width": pa.nulls(len(keys), pa.int32()),
                "original_height": pa.nulls(len(keys), pa.int32()),
            }
        )
    table = pq.read_table(parquet)
    if "status" in table.column_names:
        table = table.filter(pc.equal(table.column("status"), "success"))
    for column in ("original_width", "original_height"):
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.int32()))
    return table.select(["uid", "original_width", "original_height"])


def hash_shard(task: HashTask) -> HashResult:
    output = Path(task.output)
    if output.exists():
        return _summarize(pq.read_table(output, columns=["reason"]), skipped=True)
    expected = expected_samples(Path(task.tar))
    position = {uid: i for i, uid in enumerate(expected.column("uid").to_pylist())}
    thumbs, sizes = {}, {}
    reasons: dict[str, str] = {}
    for key, sample in read_tar_samples(task.tar):
        if key not in position or key in thumbs or key in reasons:
            continue
        payload = image_bytes(sample)
        try:
            if payload is None:
                raise ValueError("no image in sample")
            thumbs[key], *sizes[key] = decode_thumbnail(payload)
        except Exception:  # noqa: BLE001 - any undecodable payload is this sample's failure, not the shard's
            reasons[key] = "decode_error"
    hashed_uids = list(thumbs)
    hashes = phash_pixels(np.stack([thumbs[u] for u in hashed_uids])) if hashed_uids else np.zeros(0, np.uint64)
    hash_of = dict(zip(hashed_uids, to_signed(hashes).tolist(), strict=True))
    uids = expected.column("uid").to_pylist()
    table = pa.table(
        {
            "uid": uids,
            "phash": [hash_of.get(u) for u in uids],
            "width": [sizes[u][0] if u in sizes else None for u in uids],
            "height": [sizes[u][1] if u in sizes else None for u in uids],
            "original_width": expected.column("original_width").cast(pa.int32()),
            "original_height": expected.column("original_height").cast(pa.int32()),
            "reason": [None if u in hash_of else reasons.get(u, "missing_in_tar") for u in uids],
        },
        schema=SCHEMA,
    )
    write_parquet(output, table)
    return _summarize(table, skipped=False)


def _summarize(table: pa.Table, skipped: bool) -> HashResult:
    reasons = [r for r in table.column("reason").to_pylist() if r is not None]
    return HashResult(table.num_rows, table.num_rows - len(reasons), count_reasons(reasons), skipped)


def run_hash(shards_dir: Path, config: HashConfig, stage_dir: Path, map_fn: MapFn = local_map) -> Manifest:
    """pHash every image of `shards_dir`; tables go to `stage_dir/hashes/<shard>.parquet`."""
    started = time.perf_counter()
    out_dir = stage_dir / "hashes"
    out_dir.mkdir(parents=True, exist_ok=True)
    tars = sorted(Path(shards_dir).glob(config.shard_glob))
    tasks = [HashTask(str(t), str(out_dir / f"{t.stem}.parquet")) for t in tars]
    results = map_fn(hash_shard, tasks, desc="phash", weight=lambda r: r.n_in)
    n_in = sum(r.n_in for r in results)
    seconds = time.perf_counter() - started
    return Manifest(
        stage="phash",
        **{"in": n_in},
        kept=sum(r.kept for r in results),
        failed=merge_reasons(*(r.failed for r in results)),
        outputs={"hashes_dir": str(out_dir), "n_shards": str(len(tasks))},
        seconds=seconds,
        metrics={
            "samples_per_second": n_in / seconds if seconds else 0.0,
            "shards_skipped": float(sum(r.skipped for r in results)),
        },
    )


def read_hash_tables(hashes_dir: Path) -> pa.Table:
    """All successfully hashed rows, in shard order."""
    paths = sorted(Path(hashes_dir).glob("*.parquet"))
    if not paths:
        return SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in paths])
    return table.filter(pc.is_valid(table.column("phash")))
