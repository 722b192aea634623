"""The dedupe stage's shuffle against the one-table filter: the same decision for every uid.

A synthetic pool of uneven shards (one empty, failed hashes, exact copies, chains of near copies
that cross shards, evaluation copies that bridge two clusters, tied and missing sizes and scores)
is decided both ways, for several radii, every keep policy, and shuffle shapes from one partition
per band to many map files and partitions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filters.hamming import to_signed
from filters.phash_dedupe import PhashDedupeParams, phash_dedupe
from stages.dedupe import DedupeConfig, dedupe_pool
from stages.dedupe.shuffle import row_ids
from stages.phash import SCHEMA, read_hash_tables
from stages.shards import read_decisions

SIZES = [40, 0, 25, 60, 1, 33]


def _flip(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def _pool_hashes(rng: np.random.Generator, n: int, radius: int) -> list[int]:
    """Random hashes, then near copies of earlier rows (chains: a copy of a copy), exact copies."""
    hashes = [int(h) for h in rng.integers(0, 2**64, n, dtype=np.uint64)]
    for row in rng.choice(np.arange(1, n), n // 3, replace=False):
        source = hashes[int(rng.integers(0, row))]
        flips = int(rng.integers(0, max(radius, 1) + 2))  # some land beyond the radius
        hashes[row] = _flip(source, rng.choice(64, flips, replace=False).tolist())
    return hashes


def _write_pool(folder: Path, radius: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Hash files like the phash stage's, and an evaluation set near some pool rows."""
    rng = np.random.default_rng(seed)
    hashes = _pool_hashes(rng, sum(SIZES), radius)
    uids = [f"{u:032x}" for u in rng.permutation(10**6)[: len(hashes)]]  # not in row order
    folder.mkdir(parents=True)
    start = 0
    for index, size in enumerate(SIZES):
        rows = slice(start, start + size)
        failed = rng.random(size) < 0.1
        width = rng.choice([0, 10, 20, 20], size)
        table = pa.table(
            {
                "uid": uids[rows],
                "phash": pa.array(to_signed(np.array(hashes[rows], np.uint64)), mask=failed),
                "width": pa.array(width, pa.int32()),
                "height": pa.array(width, pa.int32()),
                "original_width": pa.array(width * 3, pa.int32(), mask=rng.random(size) < 0.2),
                "original_height": pa.array(width * 3, pa.int32()),
                "reason": pa.array([("decode_error" if f else None) for f in failed], pa.string()),
            },
            schema=SCHEMA,
        )
        pq.write_table(table, folder / f"{index:05d}.parquet")
        start += size
    picked = rng.choice(len(hashes), 8, replace=False)
    evals = [
        _flip(hashes[int(r)], rng.choice(64, int(rng.integers(0, radius + 1)), replace=False).tolist()) for r in picked
    ]
    evals.append(evals[0])  # two eval images with one hash: which one a row names must not depend on shards
    keys = [f"eval{i}" for i in range(len(evals))]
    scores = rng.choice([0.1, 0.5, 0.5, np.nan], len(uids))
    pq.write_table(pa.table({"uid": uids[::-1][:-5], "score": scores[::-1][:-5]}), folder.parent / "scores.parquet")
    return keys, np.array(evals, np.uint64)


def _one_table(hashes_dir: Path, config: DedupeConfig, keys: list[str], evals: np.ndarray) -> dict:
    table = read_hash_tables(hashes_dir)
    if config.scores_path:
        table = table.join(pq.read_table(config.scores_path), keys="uid", join_type="left outer")
    params = PhashDedupeParams(**config.model_dump(include=set(PhashDedupeParams.model_fields)))
    result = phash_dedupe(table, params, keys, evals)
    return dict(zip(result.uids, zip(result.keep.tolist(), result.reason, strict=True), strict=True))


def _decided(manifest) -> dict:
    table = read_decisions(manifest.outputs["decisions"])
    assert len(set(table.column("uid").to_pylist())) == table.num_rows  # every uid once
    verdicts = zip(table.column("keep").to_pylist(), table.column("reason").to_pylist(), strict=True)
    return dict(zip(table.column("uid").to_pylist(), verdicts, strict=True))


KEEPS = [
    {"keep": "lowest_uid"},
    {"keep": "largest"},
    {"keep": "highest_score", "score_column": "score"},
]
SHAPES = [{}, {"map_rows": 30, "partition_entries": 20}]


@pytest.mark.parametrize("radius", [0, 3, 8])
@pytest.mark.parametrize("keep", KEEPS, ids=lambda k: k["keep"])
@pytest.mark.parametrize("shape", SHAPES, ids=["one-partition", "many-partitions"])
def test_sharded_dedupe_equals_the_one_table_filter(tmp_path, radius, keep, shape):
    keys, evals = _write_pool(tmp_path / "hashes", radius, seed=radius)
    scores = {"scores_path": str(tmp_path / "scores.parquet")} if keep["keep"] == "highest_score" else {}
    config = DedupeConfig(max_distance=radius, eval_max_distance=max(radius - 1, 0), **keep, **scores, **shape)
    manifest = dedupe_pool(tmp_path / "hashes", config, tmp_path / "dedupe", eval_keys=keys, eval_hashes=evals)
    expected = _one_table(tmp_path / "hashes", config, keys, evals)
    assert _decided(manifest) == expected
    manifest.check_balance()
    reasons = [r.split(":")[0] for k, r in expected.values() if not k]
    assert manifest.in_count == len(expected) and manifest.kept == sum(k for k, _ in expected.values())
    assert manifest.dropped == {kind: reasons.count(kind) for kind in set(reasons)}
    if radius:
        assert manifest.dropped.get("duplicate_of", 0) > 5 and manifest.dropped.get("eval_duplicate_of", 0) > 0
    stems = sorted(p.stem for p in (tmp_path / "hashes").glob("*.parquet"))
    assert sorted(p.stem for p in Path(manifest.outputs["decisions"]).glob("*.parquet")) == stems
    assert not (tmp_path / "dedupe" / "shuffle").exists()


def test_each_shard_file_holds_its_own_hashed_rows(tmp_path):
    keys, evals = _write_pool(tmp_path / "hashes", 4, seed=1)
    manifest = dedupe_pool(tmp_path / "hashes", DedupeConfig(map_rows=50, partition_entries=20), tmp_path / "out")
    for path in sorted((tmp_path / "hashes").glob("*.parquet")):
        hashed = pq.read_table(path).filter(pa.compute.is_valid(pq.read_table(path).column("phash")))
        decided = pq.read_table(Path(manifest.outputs["decisions"]) / path.name)
        assert decided.column("uid").to_pylist() == hashed.column("uid").to_pylist()
        assert decided.column("phash").to_pylist() == hashed.column("phash").to_pylist()


def test_row_ids_number_shards_apart():
    assert row_ids(0, 3).tolist() == [0, 1, 2]
    assert row_ids(2, 2).tolist() == [2 << 32, (2 << 32) + 1]


def test_highest_score_without_scores_is_a_clear_error(tmp_path):
    _write_pool(tmp_path / "hashes", 2, seed=2)
    with pytest.raises(ValueError, match="keep=highest_score needs scores_path"):
        dedupe_pool(tmp_path / "hashes", DedupeConfig(keep="highest_score", score_column="score"), tmp_path / "out")


def test_as_ray_tasks_the_decisions_are_the_same(ray_cluster, tmp_path):
    from pipeline.executor import make_ray_map

    keys, evals = _write_pool(tmp_path / "hashes", 4, seed=4)
    config = DedupeConfig(map_rows=40, partition_entries=60)
    local = dedupe_pool(tmp_path / "hashes", config, tmp_path / "local", eval_keys=keys, eval_hashes=evals)
    remote = dedupe_pool(tmp_path / "hashes", config, tmp_path / "ray", make_ray_map(), keys, evals)
    assert _decided(remote) == _decided(local)
    assert remote.metrics["shuffle_partitions"] > 5


@pytest.mark.parametrize("keep", KEEPS, ids=lambda k: k["keep"])
def test_a_pool_without_near_duplicates_keeps_every_row_under_every_policy(tmp_path, keep):
    """No pair, so no cluster: nothing to rank by size or score, and every hashed row is kept."""
    folder = tmp_path / "hashes"
    folder.mkdir()
    hashes = [0x0000_0000_0000_0000, 0xFFFF_FFFF_0000_0000, 0x0000_FFFF_FFFF_0000]
    for index, rows in enumerate([slice(0, 2), slice(2, 3)]):
        n = len(hashes[rows])
        table = {
            "uid": [f"u{index}{i}" for i in range(n)],
            "phash": to_signed(np.array(hashes[rows], np.uint64)),
            **{c: pa.array([10] * n, pa.int32()) for c in ("width", "height", "original_width", "original_height")},
            "reason": pa.nulls(n, pa.string()),
        }
        pq.write_table(pa.table(table, schema=SCHEMA), folder / f"{index:05d}.parquet")
    pq.write_table(pa.table({"uid": ["u00"], "score": [0.5]}), tmp_path / "scores.parquet")
    scores = {"scores_path": str(tmp_path / "scores.parquet")} if keep["keep"] == "highest_score" else {}
    manifest = dedupe_pool(folder, DedupeConfig(max_distance=4, **keep, **scores), tmp_path / "out")
    assert (manifest.in_count, manifest.kept, manifest.dropped) == (3, 3, {})
