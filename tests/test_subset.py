"""Resharding keeps uids and bytes, selects subsets, and counts what a truncated tar lost."""

import tarfile

import pyarrow.parquet as pq
import pytest

from stages.shards import read_tar_samples, reshard


@pytest.fixture(scope="module")
def shards(pool_shards):
    shards_dir, download = pool_shards
    return sorted(shards_dir.glob("*.tar")), download


def _samples(paths):
    return {key: sample for p in paths for key, sample in read_tar_samples(p)}


def test_reshard_everything_preserves_samples(shards, tmp_path):
    tars, download = shards
    manifest = reshard(tars, tmp_path, samples_per_shard=64)
    manifest.check_balance()
    assert manifest.in_count == manifest.kept == download.kept
    out = sorted(tmp_path.glob("*.tar"))
    assert len(out) == -(-download.kept // 64)
    assert _samples(out) == _samples(tars)
    for tar in out:
        names = {k for k, _ in read_tar_samples(tar)}
        assert set(pq.read_table(tar.with_suffix(".parquet")).column("uid").to_pylist()) == names


def test_reshard_keeps_only_selected_uids(shards, tmp_path):
    tars, download = shards
    everything = sorted(_samples(tars))
    chosen = set(everything[::3])
    manifest = reshard(tars, tmp_path, samples_per_shard=1000, keep_uids=chosen)
    manifest.check_balance()
    assert manifest.kept == len(chosen)
    assert manifest.dropped == {"not_selected": download.kept - len(chosen)}
    assert set(_samples(sorted(tmp_path.glob("*.tar")))) == chosen


def test_truncated_input_tar_is_counted_not_fatal(shards, tmp_path):
    tars, download = shards
    broken = tmp_path / "in"
    broken.mkdir()
    for tar in tars:
        (broken / tar.name).write_bytes(tar.read_bytes())
        (broken / tar.with_suffix(".parquet").name).write_bytes(tar.with_suffix(".parquet").read_bytes())
    victim = broken / tars[0].name
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    manifest = reshard(sorted(broken.glob("*.tar")), tmp_path / "out", samples_per_shard=100)
    manifest.check_balance()
    assert manifest.in_count == download.kept
    assert manifest.failed["missing_in_tar"] > 0
    with tarfile.open(sorted((tmp_path / "out").glob("*.tar"))[0]) as tar:
        assert tar.getnames()
