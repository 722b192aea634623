"""Dedupe benchmarks: pHash throughput vs imagehash, and near-duplicate search at scale.

    .venv/bin/python benchmarks/dedupe.py --images 4000 --sizes 1000000 10000000

(1) Hashing: the same JPEG shards hashed by a plain `imagehash.phash` loop (decode + hash, one
    process) and by our code, both as the batched kernel in one process and as the phash stage
    on Ray (one task per shard). Prints images/s, ratios, and how many hashes differ (must be 0).
    The floor is the work bit-identity forces, measured in the same run: PIL open, decode,
    `convert("L")` and the 32x32 LANCZOS resize per image, on one core for the kernel and on every
    core at once (one process each) for the stage; one core's floor times the cores is printed too.
    Each round measures every side once, side by side, so the machine's drift hits all alike; rates
    are medians over rounds, ratios are taken within a round (median and min-max).
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
    import multiprocessing

    import imagehash
    import ray
    from PIL import Image

    from pipeline.executor import make_ray_map
    from pipeline.runtime import local_worker_env
    from stages.phash import HashConfig, decode_grey, phash_pixels, read_hash_tables, run_hash, stack_thumbnails, to_hex
    from stages.shards import read_tar_samples

    work = Path(tempfile.mkdtemp(prefix="bench-dedupe-"))
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    cores = len(os.sched_getaffinity(0))  # the cores this process may use, as Ray counts them
    shards = write_scene_shards(work, args.images, args.image_size, args.shard_size)
    payloads = [(k, s["jpg"]) for t in shards for k, s in read_tar_samples(t)]
    _PAYLOADS[:] = [b for _, b in payloads]  # the floor's worker processes inherit them
    n = len(payloads)
    rounds: list[dict[str, float]] = []
    # forked before Ray starts: the parallel floor's workers, one per core, kept for every round
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(cores)
    try:
        with context.Pool(cores, initializer=_keep_barrier, initargs=(barrier,)) as floor_pool:
            ray.init(
                num_cpus=cores,
                include_dashboard=False,
                _temp_dir=ray_tmp,
                logging_level=logging.WARNING,
                runtime_env={"env_vars": local_worker_env()},
            )
            run_hash(work, HashConfig(), work / "warm", map_fn=make_ray_map())  # start the workers
            for r in range(args.rounds):  # every side once per round, side by side: drift hits all alike
                started = time.perf_counter()
                reference = {k: str(imagehash.phash(Image.open(io.BytesIO(b)))) for k, b in payloads}
                t_loop = time.perf_counter() - started
                floor_one = decode_floor(payloads)
                started = time.perf_counter()
                kernel = {}
                for start in range(0, n, args.shard_size):  # a shard at a time, as the stage's tasks hash
                    shard = payloads[start : start + args.shard_size]
                    hashes = phash_pixels(stack_thumbnails([decode_grey(b)[0] for _, b in shard]))
                    kernel.update(zip((k for k, _ in shard), (to_hex(h) for h in hashes), strict=True))
                t_kernel = time.perf_counter() - started
                floor_all = parallel_floor(floor_pool, cores)
                started = time.perf_counter()
                manifest = run_hash(work, HashConfig(), work / f"stage-{r}", map_fn=make_ray_map())
                t_stage = time.perf_counter() - started
                table = read_hash_tables(work / f"stage-{r}" / "hashes")
                stage = {
                    u: to_hex(h)
                    for u, h in zip(table.column("uid").to_pylist(), table.column("phash").to_pylist(), strict=True)
                }
                rounds.append(
                    {
                        "loop": n / t_loop,
                        "floor_one_core": floor_one,
                        "kernel": n / t_kernel,
                        "floor_all_cores": floor_all,
                        "stage": n / t_stage,
                        "differ_kernel": sum(reference[k] != v for k, v in kernel.items()),
                        "differ_stage": sum(reference[k] != stage.get(k) for k in reference),
                        **stage_shares(manifest.metrics, t_stage * cores),
                    }
                )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return report_hashing(rounds, n, len(shards), cores, args.image_size)


def stage_shares(metrics: dict[str, float], core_seconds: float) -> dict[str, float]:
    """Where the stage's core-seconds (its wall time x the cores) went: each phase its tasks clocked
    (decoding is the floor's own work), and the rest, outside tasks (Ray, idle cores, the driver)."""
    from stages.phash import PHASES

    shares = {f"share_{phase}": metrics[f"task_seconds_{phase}"] / core_seconds for phase in PHASES}
    return shares | {"share_outside_tasks": 1.0 - sum(shares.values())}


_PAYLOADS: list[bytes] = []
_BARRIER = None


def _keep_barrier(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _floor_slice(bounds: tuple[int, int]) -> tuple[float, float]:
    """In a floor worker: wait until every worker holds its slice, then decode it; (start, end) times."""

    _BARRIER.wait(timeout=60)  # a worker that died breaks the barrier instead of hanging the rest
    started = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    floor_work(_PAYLOADS[bounds[0] : bounds[1]])
    return started, time.perf_counter()


def parallel_floor(pool, cores: int) -> float:
    """Images/s of the floor's PIL calls run on every core at once, measured rather than assumed:
    two processes on two cores need not do twice one's work (shared caches, memory bandwidth)."""
    edges = np.linspace(0, len(_PAYLOADS), cores + 1).astype(int)
    slices = list(zip(edges[:-1], edges[1:], strict=True))
    spans = pool.map_async(_floor_slice, slices, chunksize=1).get(timeout=600)
    return len(_PAYLOADS) / (max(end for _, end in spans) - min(start for start, _ in spans))


def report_hashing(rounds: list[dict[str, float]], n: int, shards: int, cores: int, image_size: int) -> list[dict]:
    """Per side: the median rate over rounds; ratios are taken within each round (median, min-max)."""

    def median(key: str) -> float:
        return float(np.median([r[key] for r in rounds]))

    def spread(ours: str, floor: str, scale: float = 1.0) -> tuple[float, float, float]:
        ratios = [r[ours] / (r[floor] * scale) for r in rounds]
        return float(np.median(ratios)), min(ratios), max(ratios)

    print(f"[hashing] {n} JPEGs of {image_size}px in {shards} shards, {cores} cores, {len(rounds)} rounds (medians)")
    print(f"  imagehash.phash loop (1 process):   {median('loop'):8.0f} images/s")
    print(f"  floor (PIL decode, grey, resize):   {median('floor_one_core'):8.0f} images/s on one core")
    print(f"                                      {median('floor_all_cores'):8.0f} images/s on {cores} cores at once")
    shares = {key.removeprefix("share_"): median(key) for key in rounds[0] if key.startswith("share_")}
    if shares:
        print("  phash stage, its core-seconds by phase:  " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    params = {"images": n, "image_size": image_size, "shards": shards, "rounds": len(rounds)}
    results = []
    sides = (
        ("phash_kernel", "batched kernel (1 process):       ", "kernel", "floor_one_core", 1, "differ_kernel"),
        ("phash_stage", "phash stage (Ray, task per shard):", "stage", "floor_all_cores", cores, "differ_stage"),
    )
    for name, label, key, floor_key, used, differ_key in sides:
        of_loop = spread(key, "loop")[0]
        ratio, low, high = spread(key, floor_key)
        per_core, per_core_low, per_core_high = spread(key, "floor_one_core", used)
        differ = max(int(r[differ_key]) for r in rounds)
        print(
            f"  {label} {median(key):8.0f} images/s   {of_loop:.2f}x the loop   "
            f"{ratio:.2f}x of the floor on {used} core(s) ({low:.2f}-{high:.2f})   "
            f"one core's floor x {used}: {per_core:.2f}x ({per_core_low:.2f}-{per_core_high:.2f})   "
            f"differing hashes: {differ}"
        )
        extra = {"of_floor_min": low, "of_floor_max": high, "of_one_core_floor_times_cores": per_core}
        extra |= {"differing_hashes": differ, "cores": used, "rounds": rounds}
        if name == "phash_stage" and shares:
            extra["core_seconds_by_phase"] = shares  # medians over rounds
        row = result(name, median(key), median("loop"), "images/s", params, floor=median(floor_key), **extra)
        row["ratio"] = of_loop  # within rounds, as the floor's
        results.append(row)
    return results


def decode_floor(payloads: list[tuple[str, bytes]]) -> float:
    """Images/s on one core of what a bit-identical pHash cannot skip: imagehash's own PIL calls
    (open, decode, grey, 32x32 LANCZOS), with the DCT and median left out. One pass, as ours."""
    started = time.perf_counter()
    floor_work([payload for _, payload in payloads])
    return len(payloads) / (time.perf_counter() - started)


def floor_work(payloads: list[bytes]) -> None:
    """imagehash's own PIL calls on each payload, nothing kept."""
    from PIL import Image

    for payload in payloads:
        with Image.open(io.BytesIO(payload)) as image:
            image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)


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
    parser.add_argument("--rounds", type=int, default=3, help="hashing: every side once per round")
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
