"""Dedupe benchmarks: pHash throughput vs imagehash, and near-duplicate search at scale.

    .venv/bin/python benchmarks/dedupe.py --images 4000 --sizes 1000000 10000000

(1) Hashing: the same JPEG shards hashed by a plain `imagehash.phash` loop (decode + hash, one
    process) and by our code, both as the batched kernel in one process and as the phash stage
    on Ray (one task per shard). Prints images/s, ratios, and how many hashes differ (must be 0).
    The floor is the work bit-identity forces, measured in the same run: PIL open, decode,
    `convert("L")` and the 32x32 LANCZOS resize per image on one core, times the cores a side uses
    (1 for the kernel, all for the stage).
(2) Search: n random 64-bit hashes plus 1% planted near-duplicates (up to k flipped bits), each
    size and radius in a fresh process: time (numba's compile, or the load of its cache, is timed
    apart, before), the process's RSS before the search and at its peak during it, and recall
    against brute force for sampled queries.
    `--images 0` skips (1). Run by hand, not in CI.

`--json PATH` writes one result per measurement in the benchmarks' format (benchmark_result.py):
each hashing side against the imagehash loop, and each search size against brute force (its rate
extrapolated from the sampled queries).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' oracle (tests/oracles.py), from a checkout

from benchmark_result import result, write_results  # noqa: E402 (benchmarks run as scripts)
from scene_shards import write_scene_shards  # noqa: E402


def bench_hashing(args: argparse.Namespace) -> list[dict]:
    import imagehash
    import ray
    from PIL import Image

    from pipeline.executor import make_ray_map
    from pipeline.runtime import local_worker_env
    from stages.phash import HashConfig, decode_thumbnail, phash_pixels, read_hash_tables, run_hash, to_hex
    from stages.shards import read_tar_samples

    work = Path(tempfile.mkdtemp(prefix="bench-dedupe-"))
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    try:
        shards = write_scene_shards(work, args.images, args.image_size, args.shard_size)
        payloads = [(k, s["jpg"]) for t in shards for k, s in read_tar_samples(t)]

        started = time.perf_counter()
        reference = {k: str(imagehash.phash(Image.open(io.BytesIO(b)))) for k, b in payloads}
        t_loop = time.perf_counter() - started

        floor_per_core = decode_floor(payloads)

        started = time.perf_counter()
        thumbs = np.stack([decode_thumbnail(b)[0] for _, b in payloads])
        kernel = dict(zip((k for k, _ in payloads), (to_hex(h) for h in phash_pixels(thumbs)), strict=True))
        t_kernel = time.perf_counter() - started

        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            _temp_dir=ray_tmp,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": local_worker_env()},
        )
        run_hash(work, HashConfig(), work / "warm", map_fn=make_ray_map())  # start the workers
        started = time.perf_counter()
        run_hash(work, HashConfig(), work / "stage", map_fn=make_ray_map())
        t_stage = time.perf_counter() - started
        table = read_hash_tables(work / "stage" / "hashes")
        stage = {
            u: to_hex(h)
            for u, h in zip(table.column("uid").to_pylist(), table.column("phash").to_pylist(), strict=True)
        }
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    n = len(payloads)
    differ_kernel = sum(reference[k] != v for k, v in kernel.items())
    differ_stage = sum(reference[k] != stage.get(k) for k in reference)
    print(f"[hashing] {n} JPEGs of {args.image_size}px in {len(shards)} shards, {os.cpu_count()} cores")
    cores = os.cpu_count() or 1
    print(f"  imagehash.phash loop (1 process):   {n / t_loop:8.0f} images/s")
    print(f"  floor (PIL decode, grey, resize):   {floor_per_core:8.0f} images/s per core")
    params = {"images": n, "image_size": args.image_size, "shards": len(shards)}
    results = []
    for name, label, seconds, differ, used in (
        ("phash_kernel", "batched kernel (1 process):       ", t_kernel, differ_kernel, 1),
        ("phash_stage", "phash stage (Ray, task per shard):", t_stage, differ_stage, cores),
    ):
        floor = floor_per_core * used
        print(
            f"  {label} {n / seconds:8.0f} images/s   ratio {t_loop / seconds:.2f}x   "
            f"{n / seconds / floor:.2f}x of the floor on {used} core(s)   differing hashes: {differ}"
        )
        results.append(
            result(name, n / seconds, n / t_loop, "images/s", params, floor=floor, differing_hashes=differ, cores=used)
        )
    return results


def decode_floor(payloads: list[tuple[str, bytes]]) -> float:
    """Images/s on one core of what a bit-identical pHash cannot skip: imagehash's own PIL calls
    (open, decode, grey, 32x32 LANCZOS), with the DCT and median left out. Best of two passes."""
    from PIL import Image

    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        for _, payload in payloads:
            with Image.open(io.BytesIO(payload)) as image:
                image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
        best = min(best, time.perf_counter() - started)
    return len(payloads) / best


def bench_search(n: int, k: int, queries: int) -> dict:
    """One size and radius, in a fresh process: its peak RSS is the search's (and the hashes')."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_search_in_this_process, n, k, queries).result()


class RssPeak:
    """This process's resident memory just before the block and its peak during it (sampled every
    20 ms from /proc), in MiB: what the block itself needs on top of what the process already held."""

    @staticmethod
    def now() -> float:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        import threading

        self._done = threading.Event()
        self.before = self.peak = self.now()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _search_in_this_process(n: int, k: int, queries: int) -> dict:
    from filters.hamming import band_layout, near_pairs_unique
    from tests.oracles import brute_force_neighbours

    started = time.perf_counter()
    near_pairs_unique(np.arange(1000, dtype=np.uint64), k)  # numba's compile (or its cache's load)
    compile_seconds = time.perf_counter() - started
    rng = np.random.default_rng(n)
    base = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    planted = n // 100
    sources = rng.choice(n, planted, replace=False)
    flips = np.zeros(planted, np.uint64)
    for _ in range(k):
        flips |= np.uint64(1) << rng.integers(0, 64, planted).astype(np.uint64)
    values = np.unique(np.concatenate([base, base[sources] ^ flips]))
    with RssPeak() as rss:
        started = time.perf_counter()
        i, j = near_pairs_unique(values, k)
        seconds = time.perf_counter() - started
    before, peak = rss.before, rss.peak
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    sample = np.concatenate(
        [rng.choice(len(values), queries // 2, replace=False), np.searchsorted(values, base[sources][: queries // 2])]
    )
    true_pairs = missed = 0
    brute_started = time.perf_counter()
    for q in sample.tolist():
        for other in brute_force_neighbours(values, q, k).tolist():
            true_pairs += 1
            missed += (min(q, other), max(q, other)) not in found
    per_query = (time.perf_counter() - brute_started) / len(sample)
    brute_total = per_query * len(values) / 2  # every hash against every later one
    layout = band_layout(len(values), k)
    print(
        f"[search] n={len(values):,} k={k}: {seconds:6.1f}s on {os.cpu_count()} cores (compile/cache load "
        f"{compile_seconds:.1f}s before), RSS {before:,.0f} MiB before the search, {peak:,.0f} at its peak, "
        f"{len(i):,} pairs, bands {layout.widths} r={layout.radius}; "
        f"recall on {len(sample)} sampled queries: {(true_pairs - missed)}/{true_pairs}; "
        f"brute force extrapolated from those queries: {brute_total / 3600:,.2f} h ({brute_total / seconds:,.0f}x)",
        flush=True,
    )
    return result(
        "near_duplicate_search",
        len(values) / seconds,
        len(values) / brute_total,
        "hashes/s",
        {"n": len(values), "k": k, "queries": len(sample)},
        seconds=seconds,
        compile_seconds=compile_seconds,
        rss_before_search_mib=before,
        rss_peak_during_search_mib=peak,
        pairs=len(i),
        recall=(true_pairs - missed) / max(true_pairs, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--k", type=int, nargs="*", default=[4, 8], help="Hamming radii searched")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--json", default=None, help="write the results here (benchmark_result.py's format)")
    args = parser.parse_args()
    results = bench_hashing(args) if args.images else []
    for n in args.sizes:
        results += [bench_search(n, k, args.queries) for k in args.k]
    write_results(args.json, results)


if __name__ == "__main__":
    main()
