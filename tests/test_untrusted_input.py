"""Names that come from data (captions, urls, a table's own uid column, tar member names) never become paths."""

from __future__ import annotations

import io
import re
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.download import DownloadConfig, run_download
from stages.shard_copy import reshard
from stages.shards import read_tar_samples

HOSTILE = "../../../../tmp/escaped"


def _all_files(root):
    return {p for p in root.rglob("*") if p.is_file()}


def test_hostile_table_values_stay_inside_the_stage_folder(served_pool, tmp_path):
    pool_dir, _ = served_pool
    source = pq.read_table(pool_dir / "source.parquet").slice(0, 6)
    n = source.num_rows
    table = pa.table(
        {
            "uid": [f"{HOSTILE}{i}" for i in range(n)],  # a plain table's uid column is carried, not used
            "key": [f"../key{i}" for i in range(n)],
            "url": source.column("url"),
            "caption": [f"{HOSTILE}/{i}.jpg" for i in range(n)],
        }
    )
    work = tmp_path / "work"
    work.mkdir()
    pq.write_table(table, work / "hostile.parquet")
    outside_before = _all_files(tmp_path)
    config = DownloadConfig(image_size=32, samples_per_shard=10, min_image_size=8, thread_count=4)
    manifest = run_download(str(work / "hostile.parquet"), config, work / "download")
    manifest.check_balance()
    created = _all_files(tmp_path) - outside_before
    assert created and all((work / "download") in p.parents for p in created)
    for tar in (work / "download" / "shards").glob("*.tar"):
        with tarfile.open(tar) as archive:
            for name in archive.getnames():
                assert re.fullmatch(r"[0-9a-f]{32}\.(jpg|txt|json)", name), name  # our uids, never the table's


def test_a_metadata_table_whose_own_uids_are_paths_is_refused_in_one_line(tmp_path):
    from stages.source_table import SourceTableError, load_source

    table = pa.table({"uid": ["a" * 32, f"{HOSTILE}1"], "url": ["http://x/1", "http://x/2"], "text": ["a", "b"]})
    pq.write_table(table, tmp_path / "datacomp-shaped.parquet")  # DataComp's columns: its uids are kept
    with pytest.raises(SourceTableError) as err:
        load_source(str(tmp_path / "datacomp-shaped.parquet"))
    assert "1 uid(s) that are not plain names" in str(err.value) and "\n" not in str(err.value)
    assert load_source(str(tmp_path / "datacomp-shaped.parquet"), "plain", caption_col="text").num_rows == 2


def test_tar_member_paths_are_reduced_to_their_base_name(tmp_path):
    hostile = tmp_path / "in" / "hostile.tar"
    hostile.parent.mkdir()
    with tarfile.open(hostile, "w") as archive:
        for name, data in [(f"{HOSTILE}/abc.jpg", b"\xff\xd8jpeg"), (f"{HOSTILE}/abc.txt", b"a caption")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"uid": ["abc"], "status": ["success"]}), hostile.with_suffix(".parquet"))
    assert list(read_tar_samples(hostile)) == [("abc", {"jpg": b"\xff\xd8jpeg", "txt": b"a caption"})]
    out = tmp_path / "out"
    manifest = reshard([hostile], out, samples_per_shard=10)
    assert manifest.kept == 1
    assert all(out in p.parents for p in _all_files(tmp_path) - {hostile, hostile.with_suffix(".parquet")})
    with tarfile.open(next(out.glob("*.tar"))) as archive:
        assert sorted(archive.getnames()) == ["abc.jpg", "abc.txt"]


def test_demo_server_answers_on_loopback_only(tmp_path):
    import socket
    import urllib.request

    from pipeline.serve import serve_directory

    (tmp_path / "a.jpg").write_bytes(b"x")
    with serve_directory(tmp_path) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        assert base_url.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(f"{base_url}/a.jpg", timeout=5).read() == b"x"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the address other machines would use
            probe.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, it only picks a route
            external = probe.getsockname()[0]
        if external.startswith("127."):
            return  # no non-loopback interface here
        with pytest.raises(OSError), socket.create_connection((external, port), timeout=2):
            pass
