"""The generated pool, its ground truth and eval set, and the loopback server that serves it."""

import json
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.serve import LOOPBACK, serve_directory
from stages import demo_scenes
from stages.demo_pool import GOOD_PAIR_DEFECTS, PoolRow, _write_labels
from stages.uid import compute_uid


def test_server_serves_the_pool_files_on_loopback_only(served_pool):
    pool_dir, base_url = served_pool
    assert base_url.startswith(f"http://{LOOPBACK}:")
    truth = pq.read_table(pool_dir / "ground_truth.parquet").to_pylist()
    clean = next(r for r in truth if r["defect"] == "clean")
    with urllib.request.urlopen(clean["url"], timeout=5) as response:
        body = response.read()
    name = clean["url"].rsplit("/", 1)[1]
    assert body == (pool_dir / "files" / name).read_bytes()
    Image.open(pool_dir / "files" / name).verify()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base_url}/no_such_file.jpg", timeout=5)
    assert err.value.code == 404


def test_server_delays_slow_urls_and_stops_cleanly(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    import time

    with serve_directory(tmp_path, slow_seconds=0.5) as base_url:
        started = time.perf_counter()
        assert urllib.request.urlopen(f"{base_url}/slow/a.jpg", timeout=5).read() == b"x"
        assert time.perf_counter() - started >= 0.5
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base_url}/a.jpg", timeout=2)


def test_ground_truth_matches_config_and_uids(served_pool):
    pool_dir, _ = served_pool
    truth = pq.read_table(pool_dir / "ground_truth.parquet").to_pylist()
    source = pq.read_table(pool_dir / "source.parquet").to_pylist()
    assert len(truth) == len(source) == 300
    assert [compute_uid(r["url"], r["caption"]) for r in source] == [r["uid"] for r in truth]
    defects = {}
    for row in truth:
        defects[row["defect"]] = defects.get(row["defect"], 0) + 1
    # defaults: exact 4%, near 6%, mismatched 8%, low quality 6% + tiny 2%, unsafe 4%, bad caption 3%,
    # broken 3%, corrupt 3%, leak 2%
    assert defects == {
        "clean": 177,
        "exact_duplicate": 12,
        "near_duplicate": 18,
        "mismatched_caption": 24,
        "low_quality": 24,
        "unsafe": 12,
        "bad_caption": 9,
        "broken_url": 9,
        "corrupt_file": 9,
        "eval_leak": 6,
    }
    uids = {r["uid"] for r in truth}
    for row in truth:
        if row["defect"] in {"exact_duplicate", "near_duplicate"}:
            assert row["duplicate_of"] in uids
        if row["defect"] == "exact_duplicate":
            original = next(r for r in truth if r["uid"] == row["duplicate_of"])
            own = (pool_dir / "files" / row["url"].rsplit("/", 1)[1]).read_bytes()
            assert own == (pool_dir / "files" / original["url"].rsplit("/", 1)[1]).read_bytes()
        if row["defect"] == "mismatched_caption":
            assert row["label"] not in row["caption"]
        if row["defect"] == "clean":
            assert row["label"] in row["caption"]
    assert all(r["unsafe"] == (r["defect"] == "unsafe") for r in truth)


def test_eval_set_is_held_out_and_labelled(served_pool):
    pool_dir, _ = served_pool
    eval_dir = pool_dir / "eval"
    labels = pq.read_table(eval_dir / "labels.parquet").to_pylist()
    names = json.loads((eval_dir / "classnames.json").read_text())
    assert names == demo_scenes.class_names() and len(names) == 120
    assert len(labels) == 40
    assert all(names[r["label_index"]] == r["label"] for r in labels)
    with tarfile.open(eval_dir / "00000.tar") as tar:
        members = tar.getnames()
    assert len(members) == 3 * 40
    eval_uids = {r["uid"] for r in labels}
    truth = pq.read_table(pool_dir / "ground_truth.parquet").to_pylist()
    assert not eval_uids & {r["uid"] for r in truth}
    leaks = [r for r in truth if r["defect"] == "eval_leak"]
    assert leaks and all(r["duplicate_of"] in eval_uids for r in leaks)


def test_pool_generation_is_deterministic(tmp_path):
    from stages.demo_pool import DemoPoolConfig, generate_pool

    config = DemoPoolConfig(n_samples=60, n_eval=10, seed=7)
    for name in ("a", "b"):
        (tmp_path / name / "files").mkdir(parents=True)
        generate_pool(config, tmp_path / name, "http://127.0.0.1:1")
    assert (tmp_path / "a" / "ground_truth.parquet").read_bytes() == (
        tmp_path / "b" / "ground_truth.parquet"
    ).read_bytes()


def test_labels_disagree_as_three_raters_would_a_few_percent_flipped(tmp_path):
    """3,000 labelled items, a tenth unsafe, a tenth degraded, a fifth mismatched: each rater errs
    on a yes/no question 10% of the time, so the majority of three is wrong on 2.8% of items;
    ratings carry each rater's offset, so degraded and good images overlap a little."""
    rng = np.random.default_rng(0)
    defects = rng.choice(["clean", "low_quality", "mismatched_caption", "unsafe"], 3_000, p=[0.6, 0.1, 0.2, 0.1])
    rows = [
        PoolRow(f"http://x/{i}", f"caption {i}", "cat", d, unsafe=d == "unsafe", labelled=True)
        for i, d in enumerate(defects)
    ]
    _write_labels(rows, tmp_path / "labels.parquet", np.random.default_rng(1))
    labels = pq.read_table(tmp_path / "labels.parquet")
    assert labels.column("uid").to_pylist() == [r.uid for r in rows]
    unsafe = np.asarray(labels.column("unsafe").to_pylist())
    good = np.asarray(labels.column("good_pair").to_pylist())
    for said, truth in ((unsafe, defects == "unsafe"), (good, np.isin(defects, list(GOOD_PAIR_DEFECTS)))):
        assert 0.015 < (said != truth).mean() < 0.045  # 3 p^2 (1 - p) + p^3 = 0.028 at p = 0.1
    rating = np.asarray(labels.column("rating").to_pylist())
    low = defects == "low_quality"
    assert rating[low].mean() < 3.5 < 5.5 < rating[~low].mean()
    assert 0 < ((rating < 4.5) != low).mean() < 0.05  # a few items rated on the wrong side
    assert np.all((rating >= 1) & (rating <= 10)) and np.asarray(labels.column("rating_std").to_pylist()).mean() > 0.5
    agreement = np.asarray(labels.column("agreement").to_pylist())
    assert 0.9 < agreement.mean() < 0.95 and set(np.round(agreement * 6).astype(int)) <= {4, 5, 6}


def test_labelled_slice_has_ratings_flags_and_good_pairs_from_the_ground_truth(served_pool):
    pool_dir, _ = served_pool
    truth = {r["uid"]: r for r in pq.read_table(pool_dir / "ground_truth.parquet").to_pylist()}
    labels = pq.read_table(pool_dir / "labels.parquet").to_pylist()
    assert len(labels) == 90 == sum(r["labelled"] for r in truth.values())  # 30% of 300
    assert all(truth[row["uid"]]["labelled"] for row in labels)
    agree = [row["good_pair"] == (truth[row["uid"]]["defect"] in GOOD_PAIR_DEFECTS) for row in labels]
    assert sum(agree) >= 80  # the raters' majority, mostly right (see the next test)
    bad = [r for r in truth.values() if r["defect"] == "bad_caption"]
    assert {r["detail"] for r in bad} == {"filename", "too_short", "not_english"}
