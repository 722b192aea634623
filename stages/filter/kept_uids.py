"""`kept_uids.npy`, DataComp's one sorted file of uid pairs, without one process holding the kept uids.

Each shard's task writes its kept uids, sorted, as `<shard>.npy` into a parts folder. A task per
range of the uids' first 64 bits (a bucket of about `BUCKET_ROWS` uids) reads its slice of every
part (a binary search in the memory-mapped, sorted parts), sorts it and writes it; the driver then
copies the buckets, in order, into the one file. The driver holds a count per part and per bucket.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from filters.uid_list import DATACOMP_DTYPE
from pipeline.atomic import atomic_path
from pipeline.mapping import MapFn

BUCKET_ROWS = 20_000_000  # uids one bucket task sorts (16 bytes each)


@dataclass(frozen=True)
class BucketJob:
    parts: tuple[str, ...]
    low: int  # first 64 bits, inclusive
    high: int | None  # exclusive; None: to the end
    out: str


def _slice(path: str, low: int, high: int | None) -> np.ndarray:
    pairs = np.load(path, mmap_mode="r")
    if len(pairs) == 0:
        return np.zeros(0, DATACOMP_DTYPE)
    first = pairs["f0"]
    start = int(np.searchsorted(first, np.uint64(low), side="left"))
    stop = len(pairs) if high is None else int(np.searchsorted(first, np.uint64(high), side="left"))
    return np.array(pairs[start:stop])


def sort_bucket(job: BucketJob) -> int:
    """The bucket's uids from every part, sorted and unique, to `job.out`; returns how many."""
    slices = [_slice(p, job.low, job.high) for p in job.parts]
    merged = np.unique(np.concatenate(slices)) if slices else np.zeros(0, DATACOMP_DTYPE)
    np.save(job.out, merged)
    return len(merged)


def merge_kept_uids(parts: list[str], rows: int, out: Path, work: Path, map_fn: MapFn) -> str:
    """One sorted, unique `out` from the sorted `parts` (`rows` uids in all)."""
    buckets = max(1, math.ceil(rows / BUCKET_ROWS))
    bounds = [b * 2**64 // buckets for b in range(buckets)]
    work.mkdir(parents=True, exist_ok=True)
    jobs = [
        BucketJob(tuple(parts), low, high, str(work / f"bucket-{index:06d}.npy"))
        for index, (low, high) in enumerate(zip(bounds, [*bounds[1:], None], strict=True))
    ]
    sizes = map_fn(sort_bucket, jobs, desc="filter: kept uids")
    with atomic_path(out) as tmp:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=DATACOMP_DTYPE, shape=(sum(sizes),))
        start = 0
        for job, size in zip(jobs, sizes, strict=True):
            merged[start : start + size] = np.load(job.out, mmap_mode="r")
            start += size
        merged.flush()
        del merged
    shutil.rmtree(work, ignore_errors=True)
    return str(out)
