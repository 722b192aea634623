"""Ingest throughput: our Ray download stage vs standalone img2dataset, same loopback source.

    .venv/bin/python benchmarks/ingest.py --samples 4000

Both download the same generated pool from the same loopback server with the same resize,
thread and shard settings; the baseline is img2dataset's own `download()` with its
multiprocessing distributor and one process per core. Runs alternate (baseline, ours, baseline,
...). The headline is the cold ratio, the first run of each: img2dataset starts its processes anew
every run while our Ray workers stay warm, so a best-of-N would favour us. Every run's seconds and
both sides' success counts (from img2dataset's `*_stats.json`, which both write) are printed, with
the warm ratio too (the medians of the runs after the first: warm against warm), and
`--json PATH` writes them in the benchmarks' format (benchmark_result.py).
Run by hand (not in CI). The main guard is required: img2dataset spawns its workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from benchmark_result import result, write_results  # noqa: E402 (benchmarks run as scripts)


def successes(folder: Path) -> int:
    """Images written, as img2dataset counts them in each shard's stats file (both sides write them)."""
    return sum(json.loads(p.read_text())["successes"] for p in folder.rglob("*_stats.json"))


def run_baseline(source: Path, out: Path, args: argparse.Namespace) -> float:
    from img2dataset import download

    started = time.perf_counter()
    download(
        url_list=str(source),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(out),
        processes_count=args.processes,
        thread_count=args.threads,
        number_sample_per_shard=args.shard_size,
        image_size=args.image_size,
        resize_mode="border",
        encode_quality=90,
        timeout=5,
        distributor="multiprocessing",
        enable_wandb=False,
        compute_hash="sha256",
        extract_exif=False,
    )
    return time.perf_counter() - started


def run_ours(source: Path, out: Path, args: argparse.Namespace) -> float:
    from pipeline.executor import make_ray_map
    from stages.download import DownloadConfig, run_download

    config = DownloadConfig(
        image_size=args.image_size,
        samples_per_shard=args.shard_size,
        thread_count=args.threads,
        encode_quality=90,
        timeout=5,
    )
    started = time.perf_counter()
    manifest = run_download(str(source), config, out, map_fn=make_ray_map())
    manifest.check_balance()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--source-size", type=int, default=256, help="pixel size of the served images")
    parser.add_argument("--image-size", type=int, default=128, help="resize target")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the first is the headline")
    parser.add_argument("--json", default=None, help="write the result here (benchmark_result.py's format)")
    args = parser.parse_args()

    import ray

    from pipeline.runtime import local_worker_env
    from pipeline.serve import serve_directory
    from stages.demo_pool import DemoPoolConfig, generate_pool

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    (work / "pool" / "files").mkdir(parents=True)
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    ray.init(
        num_cpus=args.processes,
        include_dashboard=False,
        _temp_dir=ray_tmp,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": local_worker_env()},
    )
    try:
        with serve_directory(work / "pool" / "files") as base_url:
            pool = DemoPoolConfig(n_samples=args.samples, n_eval=10, image_size=args.source_size)
            generate_pool(pool, work / "pool", base_url)
            source = work / "pool" / "source.parquet"
            ours, base, ok_ours, ok_base = [], [], [], []
            for repeat in range(args.repeats):
                base.append(run_baseline(source, work / f"baseline{repeat}", args))
                ok_base.append(successes(work / f"baseline{repeat}"))
                ours.append(run_ours(source, work / f"ours{repeat}", args))
                ok_ours.append(successes(work / f"ours{repeat}"))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    n = args.samples
    print(
        f"rows: {n}, {args.processes} processes/tasks x {args.threads} threads, "
        f"{args.source_size}px -> {args.image_size}px, shards of {args.shard_size}"
    )
    for name, runs, ok in (
        ("img2dataset (multiprocessing):", base, ok_base),
        ("pipeline download on Ray:     ", ours, ok_ours),
    ):
        listed = ", ".join(f"{s:.1f}s ({k} ok)" for s, k in zip(runs, ok, strict=True))
        print(f"{name} {n / runs[0]:8.1f} samples/s cold   runs: {listed}")
    print(f"cold ratio (ours / img2dataset, first run of each): {base[0] / ours[0]:.2f}x")
    warm = None
    if len(ours) > 1:  # the later runs: img2dataset's page cache and imports warm, our Ray workers up
        warm = statistics.median(base[1:]) / statistics.median(ours[1:])
        print(f"warm ratio (ours / img2dataset, median of the runs after the first): {warm:.2f}x")
    params = {
        k: getattr(args, k) for k in ("samples", "source_size", "image_size", "shard_size", "threads", "processes")
    }
    extra = {
        "seconds": {"ours": ours, "anchor": base},
        "successes": {"ours": ok_ours, "anchor": ok_base},
        "warm_ratio": warm,
    }
    write_results(args.json, [result("ingest", n / ours[0], n / base[0], "samples/s", params, **extra)])


if __name__ == "__main__":
    main()
