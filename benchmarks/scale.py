"""Driver memory and throughput of the pipeline's middle on a synthetic pool with no images.

The pool is written as the real stages write it, one parquet per shard: download tables (uid,
caption, sizes, status), phash tables (64-bit hashes, 1% planted near-duplicates within the
radius) and embed tables (512-d float16 unit image and text embeddings, a CLIP score). Then the
real stage functions run on it in one driver process, with a local Ray for their tasks:
dedupe -> filter (dedupe ∩ basic ∩ clip_score top 30% ∩ image_based) -> subset decisions (the
kept-uid join the subset stage and the train mask make). Each size runs in a fresh process.

    .venv/bin/python benchmarks/scale.py --rows 1000000 10000000 --json scale.json

`--pools DIR` writes each pool there once and reuses it (writing 10M rows takes about 20 minutes
on 2 cores); `--write-only` stops after writing. Per size it prints and writes: wall time per
stage, rows/s per core, the driver's peak RSS (`getrusage`) and its peak during each stage
(sampled from /proc every 0.05 s), and the peak RSS of the largest Ray worker (every 0.2 s).
The target (the data-plane issue): driver peak RSS at 10M <= 1.3x its value at 1M, rows/s per
core not falling with size.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the pipeline's packages, from a checkout

from benchmark_result import result, write_results  # noqa: E402 (benchmarks run as scripts)

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "dog",
    "cat",
    "car",
    "house",
    "tree",
    "bird",
    "boat",
    "on",
    "in",
    "at",
    "with",
    "near",
    "old",
    "new",
    "bright",
    "dark",
    "street",
    "beach",
    "mountain",
    "city",
    "garden",
    "kitchen",
    "table",
    "chair",
    "window",
    "river",
    "sky",
]


def _shard_tables(rows: int, dim: int, rng: np.random.Generator, pool_hashes: np.ndarray):
    """(download table, phash table, embed table) of one shard, as the stages write them."""
    import pyarrow as pa

    uids = rng.bytes(16 * rows).hex()
    uid = [uids[i * 32 : (i + 1) * 32] for i in range(rows)]
    lengths = rng.integers(1, 12, rows)
    captions = [" ".join(rng.choice(WORDS, n)) for n in lengths]
    width, height = rng.integers(64, 1024, rows), rng.integers(64, 1024, rows)
    download = pa.table(
        {
            "uid": uid,
            "caption": captions,
            "status": ["success"] * rows,
            "original_width": width.astype(np.int64),
            "original_height": height.astype(np.int64),
        }
    )
    hashes = rng.integers(0, 2**63 - 1, rows, dtype=np.int64)
    near = rng.random(rows) < 0.01  # a near-duplicate of an earlier hash: three bits flipped
    if near.any() and len(pool_hashes):
        sources = pool_hashes[rng.integers(0, len(pool_hashes), near.sum())]
        flips = np.zeros(near.sum(), np.int64)
        for _ in range(3):
            flips |= np.int64(1) << rng.integers(0, 62, near.sum()).astype(np.int64)
        hashes[near] = sources ^ flips
    phash = pa.table(
        {
            "uid": uid,
            "phash": hashes,
            "width": np.full(rows, 64, np.int32),
            "height": np.full(rows, 64, np.int32),
            "original_width": width.astype(np.int32),
            "original_height": height.astype(np.int32),
            "reason": pa.nulls(rows, pa.string()),
        }
    )
    embed = {"uid": pa.array(uid), "reason": pa.nulls(rows, pa.string())}
    for name in ("image_emb", "text_emb"):
        matrix = rng.standard_normal((rows, dim), np.float32)
        matrix = (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float16)
        embed[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)
    embed["clip_score"] = pa.array(rng.uniform(0.1, 0.4, rows).astype(np.float32))
    return download, phash, pa.table(embed), hashes


def write_pool(root: Path, rows: int, per_shard: int, dim: int, seed: int) -> dict[str, Path]:
    import pyarrow.parquet as pq

    from stages.shards import shard_name

    dirs = {"shards": root / "download" / "shards", "hashes": root / "phash" / "hashes", "embed": root / "embeddings"}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recent = np.zeros(0, np.int64)  # near-duplicates copy hashes of the shard before (bounded memory)
    for index in range((rows + per_shard - 1) // per_shard):
        n = min(per_shard, rows - index * per_shard)
        download, phash, embed, recent = _shard_tables(n, dim, rng, recent)
        name = shard_name(index)
        pq.write_table(download, dirs["shards"] / f"{name}.parquet")
        pq.write_table(phash, dirs["hashes"] / f"{name}.parquet")
        pq.write_table(embed, dirs["embed"] / f"{name}.parquet")
    targets = rng.standard_normal((20, dim), np.float32)
    np.save(root / "targets.npy", targets / np.linalg.norm(targets, axis=1, keepdims=True))
    return {**dirs, "targets": root / "targets.npy"}


class Sampler:
    """Calls `sample` every `interval` seconds on a thread while the `with` block runs."""

    interval = 0.2

    def __init__(self):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def _resident_mib(pid: str) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class WorkerRss(Sampler):
    """The peak resident memory of any Ray worker process (`ray::...`), sampled from /proc."""

    def __init__(self):
        super().__init__()
        self.peak_mib = 0.0

    def sample(self) -> None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                    self.peak_mib = max(self.peak_mib, _resident_mib(pid))
            except (OSError, ValueError, IndexError):
                continue


class DriverRss(Sampler):
    """The driver's own resident memory, sampled every 0.05 s: its peak during each stage."""

    interval = 0.05

    def __init__(self):
        super().__init__()
        self.peaks: dict[str, float] = {}
        self._stage: str | None = None

    def sample(self) -> None:
        if self._stage is not None:
            self.peaks[self._stage] = max(self.peaks.get(self._stage, 0.0), _resident_mib("self"))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._stage = name
        try:
            yield
        finally:
            self._stage = None


def _driver_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_size(rows: int, per_shard: int, dim: int, clusters: int, workdir: Path) -> dict:
    """One size, in this (fresh) process: the pool written, then the three stages timed."""
    import ray

    from pipeline.executor import make_ray_map
    from stages.dedupe import DedupeConfig, run_dedupe
    from stages.filter import FilterConfig
    from stages.filter.pool_table import PoolSources
    from stages.filter.sharded import run_sharded
    from stages.selection import write_kept_mask

    started = time.perf_counter()
    paths = written_pool(workdir, rows, per_shard, dim)
    write_seconds = time.perf_counter() - started
    before = _driver_peak_mib()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    seconds: dict[str, float] = {}

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        started = time.perf_counter()
        with driver.stage(stage):
            yield
        seconds[stage] = time.perf_counter() - started

    with WorkerRss() as workers, DriverRss() as driver:
        with timed("dedupe"):
            dedupe = run_dedupe(paths["hashes"], DedupeConfig(), workdir / "dedupe", make_ray_map())
        sources = PoolSources(
            str(paths["shards"]), str(paths["hashes"]), dedupe.outputs["decisions"], str(paths["embed"])
        )
        strategy = [
            {"name": "dedupe"},
            {"name": "basic"},
            {"name": "clip_score", "top_fraction": 0.3},
            {"name": "image_based", "targets": str(paths["targets"]), "n_clusters": clusters},
        ]
        config = FilterConfig.model_validate({"strategy": strategy, "examples": 0})
        with timed("filter"):
            filtered = run_sharded(sources, config.strategy, workdir / "filter", make_ray_map()).manifest
        tars = [str(p.with_suffix(".tar")) for p in sorted(paths["shards"].glob("*.parquet"))]
        with timed("subset_decisions"):
            mask = write_kept_mask(tars, filtered.outputs["decisions"], workdir / "kept")
    ray.shutdown()
    total = sum(seconds.values())
    cores = os.cpu_count() or 1
    peak = _driver_peak_mib()
    print(
        f"[scale] {rows:,} rows: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
        + f"; {rows / total / cores:,.0f} rows/s per core; driver peak RSS {peak:,.0f} MiB "
        f"({before:,.0f} before the stages; per stage "
        + ", ".join(f"{k} {v:,.0f}" for k, v in driver.peaks.items())
        + f"); largest Ray worker {workers.peak_mib:,.0f} MiB; "
        f"kept {mask.kept:,} of {mask.in_count:,} (writing the pool took {write_seconds:.0f} s)",
        flush=True,
    )
    return result(
        "scale_driver_memory",
        rows / total / cores,
        0.0,
        "rows/s per core",
        {"rows": rows, "per_shard": per_shard, "dim": dim, "image_based_clusters": clusters},
        stage_seconds=seconds,
        driver_peak_rss_mib=peak,
        driver_rss_after_writing_mib=before,
        driver_peak_rss_mib_by_stage=driver.peaks,
        largest_worker_peak_rss_mib=workers.peak_mib,
        kept=mask.kept,
        dedupe_kept=dedupe.kept,
        dedupe_pairs=dedupe.metrics["near_duplicate_pairs"],
    )


POOL_WRITTEN = "pool-written"  # marks a pool folder whose writing finished


def written_pool(root: Path, rows: int, per_shard: int, dim: int) -> dict[str, Path]:
    """The pool under `root`, written first unless an earlier run finished writing it there."""
    if (root / POOL_WRITTEN).exists():
        dirs = {"shards": root / "download" / "shards", "hashes": root / "phash" / "hashes"}
        return {**dirs, "embed": root / "embeddings", "targets": root / "targets.npy"}
    paths = write_pool(root, rows, per_shard, dim, seed=rows)
    (root / POOL_WRITTEN).touch()
    return paths


def _in_fresh_process(rows: int, per_shard: int, dim: int, clusters: int, pools: Path | None, write_only: bool) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workdir = pools / f"rows-{rows}-shard-{per_shard}-dim-{dim}" if pools else Path(tempfile.mkdtemp(prefix="scale-"))
    for stage in ("dedupe", "filter", "kept"):  # a reused pool keeps only what write_pool wrote
        shutil.rmtree(workdir / stage, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            if write_only:
                pool.submit(written_pool, workdir, rows, per_shard, dim).result()
                return {}
            return pool.submit(run_size, rows, per_shard, dim, clusters, workdir).result()
    finally:
        if pools is None:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--per-shard", type=int, default=10_000, help="rows per shard (DataComp's 10,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000, help="image_based's k-means clusters")
    parser.add_argument(
        "--pools",
        type=Path,
        default=None,
        help="write each pool here once, reuse it after (default: a temporary folder)",
    )
    parser.add_argument("--write-only", action="store_true", help="write the pools under --pools and stop")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.write_only and args.pools is None:
        parser.error("--write-only needs --pools")
    sizes = [(n, args.per_shard, args.dim, args.clusters, args.pools, args.write_only) for n in args.rows]
    results = [_in_fresh_process(*size) for size in sizes]
    if args.write_only:
        return
    if len(results) > 1:
        first, last = results[0], results[-1]
        growth = last["extra"]["driver_peak_rss_mib"] / first["extra"]["driver_peak_rss_mib"]
        print(
            f"[scale] driver peak RSS x{growth:.2f} from {first['params']['rows']:,} to {last['params']['rows']:,} "
            f"rows (target <= 1.3); rows/s per core {first['ours']:,.0f} -> {last['ours']:,.0f}"
        )
    if args.json:
        write_results(args.json, results)


if __name__ == "__main__":
    main()
