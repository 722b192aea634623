"""Ingest throughput: our Ray download stage vs standalone img2dataset, same loopback source.

    .venv/bin/python benchmarks/ingest.py --samples 4000

Both download the same generated pool from the same loopback server with the same resize,
thread and shard settings; the baseline is img2dataset's own `download()` with its
multiprocessing distributor and one process per core. Prints samples/s for each and the ratio.
Run by hand (not in CI). The main guard is required: img2dataset spawns its workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


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


def run_ours(source: Path, out: Path, args: argparse.Namespace) -> tuple[float, int]:
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
    return time.perf_counter() - started, manifest.kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--source-size", type=int, default=256, help="pixel size of the served images")
    parser.add_argument("--image-size", type=int, default=128, help="resize target")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; best is reported")
    args = parser.parse_args()

    import ray

    from pipeline.runtime import WORKER_ENV
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
        runtime_env={"env_vars": WORKER_ENV},
    )
    try:
        with serve_directory(work / "pool" / "files") as base_url:
            pool = DemoPoolConfig(n_samples=args.samples, n_eval=10, image_size=args.source_size)
            generate_pool(pool, work / "pool", base_url)
            source = work / "pool" / "source.parquet"
            ours, base = [], []
            for repeat in range(args.repeats):
                base.append(run_baseline(source, work / f"baseline{repeat}", args))
                seconds, kept = run_ours(source, work / f"ours{repeat}", args)
                ours.append(seconds)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    n = args.samples
    best_base, best_ours = min(base), min(ours)
    print(
        f"rows: {n} ({kept} images kept), {args.processes} processes/tasks x {args.threads} threads, "
        f"{args.source_size}px -> {args.image_size}px, shards of {args.shard_size}"
    )
    print(
        f"img2dataset (multiprocessing): {n / best_base:8.1f} samples/s   runs: {', '.join(f'{s:.1f}s' for s in base)}"
    )
    print(
        f"pipeline download on Ray:      {n / best_ours:8.1f} samples/s   runs: {', '.join(f'{s:.1f}s' for s in ours)}"
    )
    print(f"ratio (ours / img2dataset): {best_base / best_ours:.2f}x")


if __name__ == "__main__":
    main()
