"""The filter stage shard by shard gives the whole-table strategy's verdicts, row for row.

A synthetic pool of per-shard files (as download, phash, dedupe and embed write them) with
upstream failures, tied and missing scores and uneven shards is filtered both ways: the sharded
path (a task per shard, pool figures found in passes) and `run_filter` over `build_pool_table`
(every row in one table). No Ray: the sharded path runs its tasks through `local_map`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import TypeAdapter

from filters import clustering
from filters.ranking import table_cutoff
from filters.registry import FilterParams
from pipeline.mapping import local_map
from stages.filter import FilterConfig, kept_uids, run_filter, semantic_shuffle
from stages.filter import pool_figures as figures
from stages.filter.pool_figures import ShardRead, pool_cutoff
from stages.filter.pool_table import PoolSources, build_pool_table
from stages.filter.sharded import run_sharded
from stages.phash import SCHEMA as HASH_SCHEMA
from stages.shards import read_decisions
from tests.oracles import assert_same_decisions

STEP = TypeAdapter(FilterParams)
WORDS = ["cat", "dog", "boat", "tree"]
DIM = 8


def _uid(i: int) -> str:
    return f"{i * 7919 % 100003:032x}"  # DataComp-shaped, not in row order


def _write_pool(root: Path, sizes: list[int], seed: int = 0) -> PoolSources:
    """Shards of the given sizes; some rows fail to download, hash or embed; clip scores are
    rounded so that many tie (within and across shards), a few are NaN; later shards repeat four of
    the first shard's images."""
    rng = np.random.default_rng(seed)
    first_images = np.zeros((0, DIM), np.float32)
    dirs = {name: root / name for name in ("shards", "hashes", "dedupe", "embed")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    start = 0
    for index, size in enumerate(sizes):
        stem = f"{index:05d}"
        uids = [_uid(i) for i in range(start, start + size)]
        start += size
        words = rng.choice(WORDS + ["sky", "road"], size=(size, 3))
        status = np.where(rng.random(size) < 0.1, "failed_to_download", "success")
        pq.write_table(
            pa.table(
                {
                    "uid": pa.array(uids, pa.string()),
                    "caption": pa.array([" ".join(w) for w in words], pa.string()),
                    "original_width": rng.integers(100, 400, size),
                    "original_height": rng.integers(100, 400, size),
                    "status": pa.array(status, pa.string()),
                }
            ),
            dirs["shards"] / f"{stem}.parquet",
        )
        ok = [u for u, s in zip(uids, status, strict=True) if s == "success"]
        hashed = rng.random(len(ok)) > 0.05
        hashes = pa.table(
            {
                "uid": pa.array(ok, pa.string()),
                "phash": pa.array(
                    [int(h) if k else None for h, k in zip(rng.integers(0, 2**62, len(ok)), hashed, strict=True)],
                    pa.int64(),
                ),
                "width": pa.array([64] * len(ok), pa.int32()),
                "height": pa.array([64] * len(ok), pa.int32()),
                "original_width": pa.array([100] * len(ok), pa.int32()),
                "original_height": pa.array([100] * len(ok), pa.int32()),
                "reason": pa.array([None if k else "decode_error" for k in hashed], pa.string()),
            },
            schema=HASH_SCHEMA,
        )
        pq.write_table(hashes, dirs["hashes"] / f"{stem}.parquet")
        duplicate = rng.random(len(ok)) < 0.1
        pq.write_table(
            pa.table(
                {
                    "uid": pa.array(ok, pa.string()),
                    "keep": pa.array(~duplicate, pa.bool_()),
                    "reason": pa.array([f"duplicate_of:{ok[0]}" if d else None for d in duplicate], pa.string()),
                }
            ),
            dirs["dedupe"] / f"{stem}.parquet",
        )
        embedded = [u for u in ok if rng.random() > 0.05]  # the rest never embedded
        scores = rng.normal(0.25, 0.05, len(embedded)).round(2)  # ties
        scores[rng.random(len(embedded)) < 0.05] = np.nan
        vectors = rng.normal(size=(len(embedded), DIM)).astype(np.float32)
        if index == 0:
            first_images = vectors[:4]
        elif len(vectors) > 4:  # the same images again in a later shard: their typicality ties
            vectors[: len(first_images)] = first_images
        pq.write_table(
            pa.table(
                {
                    "uid": pa.array(embedded, pa.string()),
                    "reason": pa.array([None] * len(embedded), pa.string()),
                    "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
                    "clip_score": pa.array(scores, pa.float32()),
                }
            ),
            dirs["embed"] / f"{stem}.parquet",
        )
    np.save(root / "targets.npy", np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32))
    return PoolSources(*(str(dirs[n]) for n in ("shards", "hashes", "dedupe", "embed")))


def _strategy(root: Path) -> list:
    return [
        STEP.validate_python(step)
        for step in (
            {"name": "dedupe"},
            {"name": "basic", "languages": None, "min_image_side": 150},
            {"name": "clip_score", "top_fraction": 0.3},
            {"name": "rank", "column": "clip_score", "top_fraction": 0.9, "better": "lower"},
            {"name": "clip_score", "threshold": 0.2},
            {"name": "image_based", "targets": str(root / "targets.npy"), "n_clusters": 8, "min_cluster_size": 5},
            {"name": "metaclip_balance", "words": WORDS, "t": 150, "t_pool": None},
            {"name": "semantic_dedupe", "n_clusters": 4, "min_cluster_size": 5, "epsilon": 0.1},
        )
    ]


def _whole_table(sources: PoolSources, steps: list, out: Path) -> pa.Table:
    pool = build_pool_table(
        *(Path(p) for p in (sources.shards_dir, sources.hashes_dir, sources.dedupe_decisions, sources.embeddings_dir))
    )
    manifest, _ = run_filter(pool, FilterConfig(strategy=steps), out)
    return read_decisions(manifest.outputs["decisions"]), manifest


@pytest.mark.parametrize("small", [False, True])
def test_sharded_verdicts_equal_the_whole_table_row_for_row(tmp_path, monkeypatch, small):
    """Every step's keep and score column, the final keep and reason, the counts and the kept uid
    list. `small`: the rank cutoffs go through radix passes instead of one gather, k-means is
    fitted on a sample of 50 rows gathered from the shards instead of on every row, and
    semantic_dedupe's clusters are shuffled into several partitions instead of one, and the kept
    uids are merged in buckets of 7."""
    if small:
        monkeypatch.setattr(figures, "GATHER_ROWS", 3)
        monkeypatch.setattr(clustering, "FIT_SAMPLE", 50)
        monkeypatch.setattr(semantic_shuffle, "ROWS_PER_PARTITION", 40)
        monkeypatch.setattr(kept_uids, "BUCKET_ROWS", 7)
    sources = _write_pool(tmp_path / "pool", [120, 0, 7, 250, 60])
    steps = _strategy(tmp_path / "pool")
    expected, whole = _whole_table(sources, steps, tmp_path / "whole")
    done = run_sharded(sources, steps, tmp_path / "sharded", examples=2)
    got = read_decisions(done.manifest.outputs["decisions"])
    assert len(list(Path(done.manifest.outputs["decisions"]).glob("*.parquet"))) == 5  # one per shard
    assert_same_decisions(got, expected)
    sharded = done.manifest
    assert (sharded.in_count, sharded.kept, sharded.dropped, sharded.failed) == (
        whole.in_count, whole.kept, whole.dropped, whole.failed,
    )  # fmt: skip
    assert sharded.metrics == pytest.approx(whole.metrics)
    assert np.array_equal(np.load(sharded.outputs["kept_uids"]), np.load(whole.outputs["kept_uids"]))
    assert 0 < sharded.kept < sharded.in_count and sharded.failed  # the case is not trivial
    assert sharded.metrics["2_clip_score.dropped"] > 0 and sharded.metrics["5_image_based.dropped"] > 0
    assert sharded.metrics["7_semantic_dedupe.dropped"] > 0
    assert not (tmp_path / "sharded" / "shuffle").exists()  # the shuffle's files are gone


def test_the_pool_cutoff_found_in_passes_is_the_whole_tables(tmp_path, monkeypatch):
    """Radix passes over shards find the (score, uid) of the last kept row for fractions from none
    to all, both directions, with heavy ties and NaNs. Gathering at 2 rows makes every pass run,
    through the scores' 64 bits and on into the tied rows' uids: no pass gathers more than 2 rows,
    even when a third of the pool shares the boundary score."""
    monkeypatch.setattr(figures, "GATHER_ROWS", 2)
    sources = _write_pool(tmp_path / "pool", [40, 90, 1, 33], seed=5)
    reads = [ShardRead(sources, stem) for stem in sources.stems()]
    table = pa.concat_tables([r.usable() for r in reads])
    uids = table.column("uid").to_pylist()
    gathered: list[int] = []

    def recording_map(fn, items, **_):
        results = [fn(item) for item in items]
        if items and getattr(items[0], "gather", False):
            gathered.append(sum(len(keys) for keys, _ in results))
        return results

    raw = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
    coarse = np.where(np.isnan(raw), np.nan, np.round(raw * 10) % 3)  # three values: large ties
    for name, scores in (("fine", raw), ("coarse", coarse)):
        scored = table.set_column(table.column_names.index("clip_score"), "clip_score", pa.array(scores, pa.float32()))
        monkeypatch.setattr(ShardRead, "usable", _only(scored))
        for fraction in (0.001, 0.1, 0.3, 0.97, 1.0):
            for better in ("higher", "lower"):
                params = STEP.validate_python({"name": "clip_score", "top_fraction": fraction, "better": better})
                sign = 1.0 if better == "higher" else -1.0
                signed = sign * scores.astype(np.float32).astype(np.float64)
                expected = table_cutoff(signed, uids, int(round(fraction * len(uids))))
                assert pool_cutoff(params, reads, len(uids), recording_map) == expected, (name, fraction, better)
    assert gathered and max(gathered) <= 2


def _only(scored: pa.Table):
    """`ShardRead.usable` reading each shard's rows of `scored` (the same rows, other scores)."""
    original = ShardRead.usable

    def usable(read: ShardRead) -> pa.Table:
        own = original(read).column("uid")
        return scored.filter(pc.is_in(scored.column("uid"), value_set=own))

    return usable


def test_as_ray_tasks_the_verdicts_are_the_same(ray_cluster, tmp_path):
    """Through Ray (the figures shared through the object store, each shard's semantic_dedupe piece
    sent to its own task), the decisions equal the in-process run's."""
    from pipeline.executor import make_ray_map

    sources = _write_pool(tmp_path / "pool", [80, 0, 45])
    steps = _strategy(tmp_path / "pool")
    local = run_sharded(sources, steps, tmp_path / "local")
    remote = run_sharded(sources, steps, tmp_path / "ray", make_ray_map())
    assert_same_decisions(
        read_decisions(remote.manifest.outputs["decisions"]), read_decisions(local.manifest.outputs["decisions"])
    )
    assert remote.manifest.kept == local.manifest.kept and remote.manifest.dropped == local.manifest.dropped


@pytest.mark.parametrize("bucket_rows", [2_000_000, 1])
def test_precomputed_embeddings_regrouped_by_download_shard_once_per_uid(tmp_path, monkeypatch, bucket_rows):
    """Per-npz tables become one table per download shard, in the shard's row order; a uid two npz
    files hold is taken once (the first file's), so embedded <= downloaded always holds. The join
    runs in one uid bucket, then in one bucket per row."""
    from stages import uid_join
    from stages.embed_precomputed import by_download_shard

    monkeypatch.setattr(uid_join, "ROWS_PER_BUCKET", bucket_rows)
    shards, converted, out = (tmp_path / n for n in ("shards", "converted", "out"))
    for folder in (shards, converted, out):
        folder.mkdir()
    for stem, uids in [("00000", ["c", "a", "z"]), ("00001", ["b", "d"]), ("00002", [])]:
        pq.write_table(pa.table({"uid": uids, "status": ["success"] * len(uids)}), shards / f"{stem}.parquet")
    for stem, uids, score in [("p0", ["a", "b"], 0.1), ("p1", ["b", "c", "d"], 0.2)]:
        table = pa.table({"uid": uids, "reason": pa.nulls(len(uids), pa.string()), "clip_score": [score] * len(uids)})
        pq.write_table(table, converted / f"{stem}.parquet")
    found, downloaded = by_download_shard(converted, shards, out, lambda fn, items, **_: [fn(i) for i in items])
    assert (found, downloaded) == (4, 5)  # z has no embedding; b is written once
    first = pq.read_table(out / "00000.parquet").to_pydict()
    second = pq.read_table(out / "00001.parquet").to_pydict()
    assert first["uid"] == ["c", "a"] and first["clip_score"] == [0.2, 0.1]
    assert second["uid"] == ["b", "d"] and second["clip_score"] == [0.1, 0.2]
    assert pq.read_table(out / "00002.parquet").num_rows == 0
    assert not (tmp_path / "regroup").exists()


def test_kept_uids_merged_by_bucket_are_one_sorted_unique_list(tmp_path, monkeypatch):
    """Sorted parts (one empty, uids repeated across parts, some at the extremes of 64 bits) merged
    in buckets of 5 give exactly np.unique of them all, DataComp's format."""
    from filters.uid_list import DATACOMP_DTYPE

    monkeypatch.setattr(kept_uids, "BUCKET_ROWS", 5)
    rng = np.random.default_rng(3)
    every = np.zeros(60, DATACOMP_DTYPE)
    every["f0"] = rng.integers(0, 2**64, 60, dtype=np.uint64)
    every["f0"][:3] = [0, 2**64 - 1, 2**63]
    every["f1"] = rng.integers(0, 2**64, 60, dtype=np.uint64)
    parts = []
    for index, rows in enumerate([every[:25], every[:0], every[20:60], every[::7]]):
        path = tmp_path / f"{index}.npy"
        np.save(path, np.unique(rows))
        parts.append(str(path))
    out = kept_uids.merge_kept_uids(parts, 25 + 40 + 9, tmp_path / "kept.npy", tmp_path / "work", local_map)
    merged = np.load(out)
    assert merged.dtype == DATACOMP_DTYPE and np.array_equal(merged, np.unique(every))
    assert not (tmp_path / "work").exists()
