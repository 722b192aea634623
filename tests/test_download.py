"""The ingest stage: img2dataset into uid-keyed shards, accounting, resume and bad input."""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.download import DownloadConfig, classify_failure, run_download, shard_name
from stages.source_table import SourceTableError, load_source

CONFIG = DownloadConfig(image_size=32, samples_per_shard=100, min_image_size=16, thread_count=16, timeout=5)


@pytest.fixture(scope="module")
def downloaded(served_pool, tmp_path_factory):
    pool_dir, _ = served_pool
    stage_dir = tmp_path_factory.mktemp("download")
    manifest = run_download(str(pool_dir / "source.parquet"), CONFIG, stage_dir)
    return pool_dir, stage_dir, manifest


def _shard_rows(stage_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((stage_dir / "shards").glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def test_every_row_is_accounted_for_and_matches_ground_truth(downloaded):
    pool_dir, stage_dir, manifest = downloaded
    manifest.check_balance()
    truth = {r["uid"]: r for r in pq.read_table(pool_dir / "ground_truth.parquet").to_pylist()}
    rows = _shard_rows(stage_dir)
    assert sorted(r["uid"] for r in rows) == sorted(truth)  # each uid exactly once
    for row in rows:
        outcome = "kept" if row["status"] == "success" else row["reason"]
        expected = truth[row["uid"]]["expected"]
        assert outcome == expected.split(":")[-1], (truth[row["uid"]], row["error_message"])
    assert manifest.in_count == 300
    assert manifest.dropped == {"too_small": 6}
    assert manifest.failed == {"connection_error": 4, "decode_error": 9, "http_404": 5}
    assert manifest.kept == 300 - 6 - 18


def test_img2dataset_stats_agree_with_the_manifest(downloaded):
    _, stage_dir, manifest = downloaded
    stats = [json.loads(p.read_text()) for p in sorted((stage_dir / "shards").glob("*_stats.json"))]
    assert len(stats) == 3
    assert sum(s["count"] for s in stats) == manifest.in_count
    assert sum(s["successes"] for s in stats) == manifest.kept
    assert sum(s["failed_to_download"] for s in stats) == manifest.n_failed - manifest.failed.get("decode_error", 0)


def test_tar_members_are_keyed_by_uid(downloaded):
    _, stage_dir, manifest = downloaded
    kept = {r["uid"]: r for r in _shard_rows(stage_dir) if r["status"] == "success"}
    keys = set()
    for tar_path in sorted((stage_dir / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                keys.add(key)
                if ext == "txt":
                    assert tar.extractfile(member).read().decode() == kept[key]["caption"]
                if ext == "json":
                    assert json.loads(tar.extractfile(member).read())["uid"] == key
    assert keys == set(kept) and len(keys) == manifest.kept


def test_open_clip_training_loader_reads_the_shards(downloaded):
    """open_clip's own webdataset pipeline (open_clip_train.data) must read what we write."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    _, stage_dir, manifest = downloaded
    _, _, preprocess = open_clip.create_model_and_transforms("RN50", pretrained=None)
    args = argparse.Namespace(
        val_data=str(stage_dir / "shards" / "{00000..00002}.tar"),
        val_num_samples=manifest.kept,
        batch_size=16,
        workers=0,
        world_size=1,
        seed=0,
        train_data=None,
        train_data_upsampling_factors=None,
        dataset_resampled=False,
    )
    data = get_wds_dataset(args, preprocess, is_train=False, tokenizer=open_clip.get_tokenizer("RN50"))
    seen = 0
    for images, texts in data.dataloader:
        assert images.shape[1:] == (3, 224, 224)
        assert texts.shape[1] == 77
        seen += images.shape[0]
    assert seen == manifest.kept


def test_rerun_skips_finished_parts_and_redoes_a_killed_one(served_pool, tmp_path):
    pool_dir, _ = served_pool
    source = str(pool_dir / "source.parquet")
    first = run_download(source, CONFIG, tmp_path)
    again = run_download(source, CONFIG, tmp_path)
    assert again.metrics["parts_skipped"] == 3 and again.metrics["rows_downloaded"] == 0
    # simulate a task killed mid-part: its tar is truncated and img2dataset never wrote the stats
    shards = tmp_path / "shards"
    tar = shards / f"{shard_name(1)}.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    (shards / f"{shard_name(1)}_stats.json").unlink()
    resumed = run_download(source, CONFIG, tmp_path)
    assert resumed.metrics["parts_skipped"] == 2 and resumed.metrics["rows_downloaded"] == 100
    assert (resumed.kept, resumed.dropped, resumed.failed) == (first.kept, first.dropped, first.failed)
    with tarfile.open(tar) as handle:
        assert len({m.name.split(".")[0] for m in handle.getmembers()}) == len(
            [r for r in pq.read_table(shards / f"{shard_name(1)}.parquet").to_pylist() if r["status"] == "success"]
        )


def test_duplicate_rows_unicode_captions_and_empty_urls(served_pool, tmp_path):
    pool_dir, _ = served_pool
    clean = [r for r in pq.read_table(pool_dir / "ground_truth.parquet").to_pylist() if r["defect"] == "clean"][:3]
    unicode_caption = "ein rotes Quadrat 🟥 — 赤い四角 «test»"
    table = pa.table(
        {
            "url": [clean[0]["url"], clean[0]["url"], clean[1]["url"], "", None, "not a url"],
            "caption": [clean[0]["caption"], clean[0]["caption"], unicode_caption, "empty", "null", None],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    manifest = run_download(str(tmp_path / "in.parquet"), CONFIG, tmp_path / "out")
    manifest.check_balance()
    assert manifest.in_count == 6
    assert manifest.dropped == {"duplicate_row": 1}
    assert manifest.failed == {"invalid_url": 3}
    assert manifest.kept == 2
    rows = {r["caption"]: r for r in _shard_rows(tmp_path / "out")}
    with tarfile.open(tmp_path / "out" / "shards" / "00000.tar") as tar:
        caption = tar.extractfile(f"{rows[unicode_caption]['uid']}.txt").read().decode("utf-8")
    assert caption == unicode_caption


def test_slow_server_gives_timeout_failures(tmp_path):
    from pipeline.serve import serve_directory
    from stages.demo_pool import DefectFractions, DemoPoolConfig, generate_pool

    zero = {k: 0.0 for k in DefectFractions.model_fields}
    config = DemoPoolConfig(n_samples=20, n_eval=5, slow_seconds=3, defects=DefectFractions(**{**zero, "slow": 0.2}))
    (tmp_path / "pool" / "files").mkdir(parents=True)
    with serve_directory(tmp_path / "pool" / "files", slow_seconds=config.slow_seconds) as base_url:
        generate_pool(config, tmp_path / "pool", base_url)
        fast = CONFIG.model_copy(update={"timeout": 1.0})
        manifest = run_download(str(tmp_path / "pool" / "source.parquet"), fast, tmp_path / "out")
    assert manifest.failed == {"timeout": 4}
    assert manifest.kept == 16


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("no_url.parquet", pa.table({"link": ["a"], "caption": ["b"]}), "missing column 'url'"),
        ("int_url.parquet", pa.table({"url": [1, 2], "caption": ["a", "b"]}), "column 'url' must hold strings"),
        (
            "empty.parquet",
            pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
            "no rows",
        ),
        ("broken.parquet", b"PAR1 this is not parquet", "cannot read parquet table"),
        ("table.txt", b"url caption", "unsupported table format"),
        ("bad.jsonl", b'{"url": "a", "caption": \n', "cannot read jsonl table"),
        ("missing.parquet", None, "file not found"),
    ],
)
def test_malformed_tables_fail_before_any_download_with_one_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SourceTableError) as err:
        run_download(str(path), CONFIG, tmp_path / "out")
    assert expected in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_csv_jsonl_and_folder_sources(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.csv").write_text("url,text\nhttp://x/1.jpg,one\n")
    (tmp_path / "t" / "b.jsonl").write_text('{"url": "http://x/2.jpg", "text": "two"}\n')
    table = load_source(str(tmp_path / "t"), caption_col="text")
    assert table.column("caption").to_pylist() == ["one", "two"]
    assert table.column_names == ["uid", "url", "caption"]


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
        ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_503"),
        ("failed_to_download", "The read operation timed out", "timeout"),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_error"),
        ("failed_to_download", "unknown url type: ''", "invalid_url"),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "disallowed_by_robots"),
        ("failed_to_resize", "image too small", "too_small"),
        ("failed_to_resize", "aspect ratio too large", "aspect_ratio"),
        ("failed_to_resize", "'NoneType' object has no attribute 'shape'", "decode_error"),
        ("success", None, None),
    ],
)
def test_failure_classification(status, error, reason):
    assert classify_failure(status, error) == reason
