"""pHash dedupe: filter semantics on tables built by hand, then the stages on the demo pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filters.hamming import to_signed
from filters.phash_dedupe import PhashDedupeParams, phash_dedupe
from stages.dedupe import DedupeConfig, run_dedupe
from stages.demo_truth import dedupe_quality
from stages.phash import HashConfig, read_hash_tables, run_hash
from stages.shards import read_decisions


def _table(hashes, **columns):
    uids = [f"u{i}" for i in range(len(hashes))]
    return pa.table({"uid": uids, "phash": to_signed(np.array(hashes, dtype=np.uint64)), **columns})


A, B = 0x0F0F_0F0F_0F0F_0F0F, 0xFFFF_0000_FFFF_0000


def test_clusters_are_transitive_and_keep_the_first():
    # u0 ~ u1 (3 bits), u1 ~ u2 (3 bits), u0 vs u2 = 6 bits: one cluster through u1
    hashes = [A, A ^ 0b111, A ^ 0b111 ^ 0b111000, B, B, A ^ (0xFF << 40)]
    result = phash_dedupe(_table(hashes), PhashDedupeParams(max_distance=3))
    assert result.keep.tolist() == [True, False, False, True, False, True]
    assert result.reason == [None, "duplicate_of:u0", "duplicate_of:u0", None, "duplicate_of:u3", None]
    assert result.reason_counts(lambda r: r.split(":")[0]) == {"duplicate_of": 3}


def test_keep_largest_and_highest_score():
    hashes = [A, A ^ 1, A ^ 2]
    table = _table(hashes, original_width=[10, 50, 30], original_height=[10, 50, 30], score=[0.1, 0.2, 0.9])
    largest = phash_dedupe(table, PhashDedupeParams(max_distance=2, keep="largest"))
    assert largest.keep.tolist() == [False, True, False]
    best = phash_dedupe(table, PhashDedupeParams(max_distance=2, keep="highest_score", score_column="score"))
    assert best.keep.tolist() == [False, False, True]
    assert best.reason[0] == "duplicate_of:u2"
    with pytest.raises(ValueError, match="score_column"):
        phash_dedupe(table, PhashDedupeParams(max_distance=2, keep="highest_score", score_column="nope"))


def test_eval_copies_are_dropped_and_do_not_anchor_clusters():
    hashes = [A, A ^ 1, B, B ^ 0b11]
    eval_hashes = np.array([A ^ 0b10], dtype=np.uint64)
    result = phash_dedupe(_table(hashes), PhashDedupeParams(max_distance=2, eval_max_distance=1), ["e0"], eval_hashes)
    # u0 is 1 bit from the eval image, u1 is 2 bits (beyond eval_max_distance) and survives
    assert result.reason == ["eval_duplicate_of:e0", None, None, "duplicate_of:u2"]


def test_no_duplicates_keeps_everything():
    result = phash_dedupe(_table([A, B]), PhashDedupeParams(max_distance=4))
    assert result.keep.all()


@pytest.fixture(scope="module")
def demo_hashes(served_pool, pool_shards, tmp_path_factory):
    pool_dir, _ = served_pool
    shards_dir, download = pool_shards
    work = tmp_path_factory.mktemp("dedupe")
    hashed = run_hash(shards_dir, HashConfig(), work / "phash")
    return pool_dir, work, download, hashed


def test_hash_stage_accounts_for_every_downloaded_sample(demo_hashes):
    _, work, download, hashed = demo_hashes
    hashed.check_balance()
    assert hashed.in_count == download.kept == hashed.kept
    table = read_hash_tables(work / "phash" / "hashes")
    assert table.num_rows == download.kept and table.column("width").to_pylist()[0] == 64
    again = run_hash(Path(download.outputs["shards_dir"]), HashConfig(), work / "phash")
    assert again.metrics["shards_skipped"] == 3 and again.kept == hashed.kept


def test_hash_stage_clocks_its_tasks_phases_within_its_own_time(demo_hashes):
    """The phases the tasks clock (one process here) add up to no more than the stage took, and
    decoding, the floor's own work, is the largest; a skipped shard clocks nothing."""
    _, work, download, hashed = demo_hashes
    phases = {phase: hashed.metrics[f"task_seconds_{phase}"] for phase in ("read", "decode", "hash", "write")}
    assert all(seconds > 0 for seconds in phases.values()), phases
    assert sum(phases.values()) <= hashed.seconds and max(phases, key=phases.get) == "decode"
    again = run_hash(Path(download.outputs["shards_dir"]), HashConfig(), work / "phash")
    assert sum(again.metrics[f"task_seconds_{phase}"] for phase in phases) == 0.0


def test_hash_stage_records_truncated_and_corrupt_shards(demo_hashes, tmp_path):
    _, work, download, _ = demo_hashes
    shards = tmp_path / "shards"
    shards.mkdir()
    for src in sorted(Path(download.outputs["shards_dir"]).glob("0000[01].*")):
        (shards / src.name).write_bytes(src.read_bytes())
    tar = shards / "00000.tar"
    data = bytearray(tar.read_bytes())
    data[2048:2560] = b"\x00" * 512  # zero the first image's bytes: it no longer decodes
    tar.write_bytes(bytes(data[: len(data) // 2]))  # and lose the second half of the shard
    manifest = run_hash(shards, HashConfig(), tmp_path / "phash")
    manifest.check_balance()
    assert manifest.failed["missing_in_tar"] > 0
    assert manifest.failed["decode_error"] == 1
    assert manifest.kept + manifest.n_failed == manifest.in_count


def test_planted_duplicates_and_eval_leaks_are_found(demo_hashes):
    pool_dir, work, _, hashed = demo_hashes
    config = DedupeConfig(max_distance=4, eval_sets=[str(pool_dir / "eval" / "*.tar")])
    manifest = run_dedupe(work / "phash" / "hashes", config, work / "dedupe")
    manifest.check_balance()
    assert manifest.in_count == hashed.kept
    quality = dedupe_quality(
        read_decisions(manifest.outputs["decisions"]), pq.read_table(pool_dir / "ground_truth.parquet")
    )
    # Floors sit below what k=4 measures on the demo (precision 0.93, recall 0.81, exact and resized
    # copies all found): pHash is robust to re-encoding and resizing, weak against crops.
    assert quality["dedupe_recall_exact"] == 1.0
    assert quality["dedupe_recall_resized"] >= 0.8
    assert quality["dedupe_precision"] >= 0.8
    assert quality["dedupe_recall"] >= 0.65
    assert quality["eval_leak_recall"] >= 0.5
    assert quality["eval_leak_precision"] >= 0.5
    assert manifest.dropped["eval_duplicate_of"] >= 3


def test_missing_eval_set_is_a_clear_error(demo_hashes, tmp_path):
    _, work, _, _ = demo_hashes
    with pytest.raises(FileNotFoundError, match="evaluation set not found"):
        run_dedupe(work / "phash" / "hashes", DedupeConfig(eval_sets=[str(tmp_path / "none*.tar")]), tmp_path)


def test_which_eval_image_a_copy_names_is_fixed_by_hash_values():
    """A row equal to an eval hash names that hash's last image; else the largest eval hash above its
    own within the distance, else the largest below: never an accident of which other rows are there."""
    from filters.phash_dedupe import eval_matches

    evals = np.array([0b0000, 0b1001, 0b1100, 0b1100, 0b0001_0000_0000], np.uint64)
    pool = np.array([0b1000, 0b1100, 0b1_0000_0001, 0b1111_0000_0000_0000], np.uint64)
    assert eval_matches(pool, evals, 1).tolist() == [3, 3, 4, -1]
    assert eval_matches(pool[:1], evals, 1).tolist() == [3]  # alone, the same answer
    below = np.array([0b0000, 0b0001], np.uint64)
    assert eval_matches(np.array([0b0011], np.uint64), below, 1).tolist() == [1]
