"""Resharding keeps uids and bytes, selects subsets, and counts what a truncated tar lost."""

import tarfile

import pyarrow.parquet as pq
import pytest

from stages.shard_copy import reshard
from stages.shards import read_tar_samples


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
    manifest = reshard(tars, tmp_path, samples_per_shard=1000, keep=chosen)
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


def test_tars_list_their_samples_in_their_tables_order(shards):
    """What lets the copy be planned from the tables: each tar holds its table's successful rows, in order."""
    tars, _ = shards
    for tar in tars:
        rows = pq.read_table(tar.with_suffix(".parquet"), columns=["uid", "status"]).to_pydict()
        successful = [u for u, s in zip(rows["uid"], rows["status"], strict=True) if s == "success"]
        assert [key for key, _ in read_tar_samples(tar)] == successful, tar.name


def test_the_copy_as_ray_tasks_equals_one_process_copying_tar_by_tar(ray_cluster, shards, tmp_path):
    """Output shards that straddle input shards hold the kept samples in input order, whichever way
    the work is spread; each table lists its tar's samples in the tar's order."""
    from pipeline.executor import make_ray_map

    tars, download = shards
    everything = [key for tar in tars for key, _ in read_tar_samples(tar)]
    chosen = set(everything[1::2])
    expected = [key for key in everything if key in chosen]  # what one process copying tar by tar writes
    per_shard = 37  # does not divide any input shard: pieces cross input boundaries
    for name, map_fn in (("local", None), ("ray", make_ray_map())):
        out = tmp_path / name
        manifest = reshard(tars, out, per_shard, keep=chosen, **({"map_fn": map_fn} if map_fn else {}))
        manifest.check_balance()
        assert manifest.kept == len(chosen) and manifest.outputs["n_shards"] == str(-(-len(chosen) // per_shard))
        written = sorted(out.glob("*.tar"))
        keys = [[key for key, _ in read_tar_samples(tar)] for tar in written]
        assert [k for shard in keys for k in shard] == expected, name
        assert all(len(shard) == per_shard for shard in keys[:-1])
        for tar, shard in zip(written, keys, strict=True):
            assert pq.read_table(tar.with_suffix(".parquet")).column("uid").to_pylist() == shard
        assert _samples(written) == {k: v for k, v in _samples(tars).items() if k in chosen}
