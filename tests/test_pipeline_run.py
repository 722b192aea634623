"""End to end on a real local Ray cluster: stages, manifests, MLflow run tree, resume, accounting."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.manifest import AccountingError, Manifest
from pipeline.orchestrator import run_pipeline
from stages.download import Download
from stages.shards import read_decisions


def _client(recipe) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{recipe.output_dir}/mlflow.db")


def _runs(recipe):
    client = _client(recipe)
    return client.search_runs([client.get_experiment_by_name(recipe.name).experiment_id])


def test_demo_run_records_manifests_and_mlflow_tree(ray_cluster, small_demo):
    result = run_pipeline(small_demo, run_name="r1", log=lambda m: None)
    pool, download = result.manifests["demo_pool"], result.manifests["download"]
    assert pool.in_count == pool.kept == 160
    assert download.in_count == 160
    download.check_balance()
    assert download.kept < 160 and download.failed and download.dropped
    on_disk = Manifest.read(result.run_dir / "download")
    assert on_disk == download

    runs = _runs(small_demo)
    parent = next(r for r in runs if r.info.run_id == result.mlflow_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["dedupe", "demo_pool", "download", "phash"]
    assert parent.data.params["download.samples_per_shard"] == "50"
    assert parent.info.status == "FINISHED"
    child = next(r for r in children if r.info.run_name == "download")
    assert child.data.metrics["accounting/in"] == 160
    assert child.data.metrics["accounting/kept"] == download.kept
    for reason, count in download.failed.items():
        assert child.data.metrics[f"accounting/failed/{reason}"] == count
    assert child.data.params["image_size"] == "64"
    client = _client(small_demo)
    # the MLflow 3 UI opens a custom-model experiment on its runs, not on the GenAI overview
    assert client.get_experiment_by_name(small_demo.name).tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = client.list_artifacts(child.info.run_id)
    assert [a.path for a in artifacts] == ["manifest.json"]
    local = client.download_artifacts(child.info.run_id, "manifest.json", str(small_demo.output_dir))
    assert json.loads(Path(local).read_text())["kept"] == download.kept
    series = _prometheus_series("ray_pipeline_samples_failed_total")  # Ray's metrics agent, as Prometheus scrapes it
    assert any('stage="download"' in line and 'reason="http_404"' in line for line in series), series


def _prometheus_series(name: str, timeout: float = 60) -> list[str]:
    """The lines of `name` on this node's metrics export port (Ray reports custom metrics every few seconds)."""
    import time
    import urllib.request

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.time() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            lines = [line for line in answer.read().decode().splitlines() if line.startswith(name + "{")]
        if lines or time.time() > deadline:
            return lines
        time.sleep(2)


def test_resume_skips_finished_stages_and_finished_shards(ray_cluster, small_demo):
    first = run_pipeline(small_demo, run_name="r2", log=lambda m: None)
    again = run_pipeline(small_demo, run_name="r2", resume=True, log=lambda m: None)
    assert again.skipped == ["demo_pool", "download", "phash", "dedupe"]
    assert again.mlflow_run_id == first.mlflow_run_id
    # a run killed inside the download stage: no stage manifest, one shard without its stats
    (first.run_dir / "download" / "manifest.json").unlink()
    (first.run_dir / "download" / "shards" / "00002_stats.json").unlink()
    resumed = run_pipeline(small_demo, resume=True, log=lambda m: None)  # latest run of the recipe
    assert resumed.run_dir == first.run_dir
    assert resumed.skipped == ["demo_pool", "phash", "dedupe"]
    download = resumed.manifests["download"]
    assert download.metrics["parts_skipped"] == 3 and download.metrics["rows_downloaded"] == 50
    assert (download.kept, download.failed, download.dropped) == (
        first.manifests["download"].kept,
        first.manifests["download"].failed,
        first.manifests["download"].dropped,
    )
    runs = _runs(small_demo)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.mlflow_run_id]
    assert sorted(r.info.run_name for r in children) == ["dedupe", "demo_pool", "download", "download", "phash"]


def _subset_uids(run_dir: Path) -> list[str]:
    return sorted(
        u for p in (run_dir / "subset" / "shards").glob("*.parquet") for u in pq.read_table(p)["uid"].to_pylist()
    )


def _counts(result) -> dict[str, tuple]:
    return {name: (m.in_count, m.kept, m.dropped, m.failed) for name, m in result.manifests.items()}


@pytest.mark.slow
def test_soak_three_runs_back_to_back_on_one_output_dir_agree(ray_cluster, tmp_path):
    """Fresh, resumed, fresh again, into one output dir and MLflow store: the same accounting every time."""
    from pipeline.config import load_recipe
    from tests.conftest import small_demo_overrides

    overrides = [o for o in small_demo_overrides(tmp_path / "runs") if not o.startswith("stages=")]
    with socket.socket() as sock:  # one port for all runs: the urls, and so the uids, are the same
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recipe = load_recipe(
        "demo", [*overrides, "stages=[demo_pool, download, phash, dedupe, subset]", f"source.demo.port={port}"]
    )
    first = run_pipeline(recipe, run_name="soak-a", log=lambda m: None)
    manifests = {p: p.read_text() for p in first.run_dir.glob("*/manifest.json")}
    resumed = run_pipeline(recipe, run_name="soak-a", resume=True, log=lambda m: None)
    assert resumed.skipped == list(first.manifests)
    assert {p: p.read_text() for p in first.run_dir.glob("*/manifest.json")} == manifests  # untouched
    fresh = run_pipeline(recipe, run_name="soak-b", log=lambda m: None)
    assert _counts(first) == _counts(resumed) == _counts(fresh)
    kept = [_subset_uids(r.run_dir) for r in (first, fresh)]
    assert kept[0] == kept[1] and len(kept[0]) == first.manifests["subset"].kept  # the same samples, not just counts
    assert {r.info.status for r in _runs(recipe)} == {"FINISHED"}


def test_resume_refuses_a_changed_recipe_and_a_missing_run(ray_cluster, small_demo):
    with pytest.raises(ConfigError, match="no earlier run"):
        run_pipeline(small_demo, resume=True, log=lambda m: None)
    run_pipeline(small_demo, run_name="r3", log=lambda m: None)
    with pytest.raises(ConfigError, match="already exists"):
        run_pipeline(small_demo, run_name="r3", log=lambda m: None)
    changed = small_demo.model_copy(deep=True)
    changed.download.image_size = 48  # the shards on disk were written at 64 px: resuming would mix sizes
    with pytest.raises(ConfigError, match=r"recipe changed \(download.image_size\)"):
        run_pipeline(changed, run_name="r3", resume=True, log=lambda m: None)


def test_a_run_recorded_with_a_retired_key_still_resumes(small_demo, tmp_path):
    """run.json of an earlier version holds `seed` (read by nothing, since removed): not a change."""
    from pipeline.orchestrator import load_or_create_run, recipe_record

    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"recipe": {**recipe_record(small_demo), "seed": 0}}))
    assert load_or_create_run(run_dir, small_demo)["recipe"]["seed"] == 0


def test_a_stage_that_loses_a_sample_fails_the_run(ray_cluster, small_demo, monkeypatch):
    real = Download.run

    def lossy(self, ctx, inputs):
        outputs, manifest = real(self, ctx, inputs)
        return outputs, manifest.model_copy(update={"kept": manifest.kept - 1})  # one sample vanishes

    monkeypatch.setattr(Download, "run", lossy)
    with pytest.raises(AccountingError, match=r"stage 'download' does not balance: in=160 .*\(1 samples lost\)"):
        run_pipeline(small_demo, run_name="lossy", log=lambda m: None)
    assert not (Path(small_demo.output_dir) / "lossy" / "download" / "manifest.json").exists()
    runs = _runs(small_demo)
    assert {r.info.run_name: r.info.status for r in runs}["download"] == "FAILED"


def test_a_stage_that_receives_more_than_upstream_kept_fails(ray_cluster, small_demo, monkeypatch):
    real = Download.run

    def inflating(self, ctx, inputs):
        outputs, m = real(self, ctx, inputs)
        return outputs, m.model_copy(update={"in_count": m.in_count + 1, "failed": {**m.failed, "extra": 1}})

    monkeypatch.setattr(Download, "run", inflating)
    with pytest.raises(AccountingError, match="received 161 samples but 'demo_pool' kept 160"):
        run_pipeline(small_demo, run_name="inflate", log=lambda m: None)


def test_datacomp_recipe_runs_in_miniature_on_a_datacomp_shaped_metadata_folder(ray_cluster, served_pool, tmp_path):
    """`datacomp_small` on parquet files with DataComp's metadata columns, shrunk by overrides: no
    column flags; DataComp's uids reach the shards; its L/14 score filters without an embed stage;
    the kept uids come out as a DataComp uid list that, applied again, keeps exactly them."""
    import numpy as np
    import pyarrow as pa

    from pipeline.config import load_recipe
    from stages.filter import FilterConfig, run_filter
    from stages.filter.pool_table import build_pool_table

    pool_dir, _ = served_pool
    source = pq.read_table(pool_dir / "source.parquet")
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    n = source.num_rows
    scores = np.random.default_rng(0).uniform(0.1, 0.4, n).astype(np.float32)
    for part, rows in enumerate((slice(0, n // 2), slice(n // 2, n))):
        chunk = source.slice(rows.start, rows.stop - rows.start)
        table = pa.table(
            {
                "uid": [f"{i:032x}" for i in range(rows.start, rows.stop)],
                "url": chunk.column("url"),
                "text": chunk.column("caption"),
                "original_width": pa.array([512] * chunk.num_rows, pa.int64()),
                "original_height": pa.array([512] * chunk.num_rows, pa.int64()),
                "clip_l14_similarity_score": pa.array(scores[rows]),
                "sha256": [f"{i:064x}" for i in range(rows.start, rows.stop)],
            }
        )
        pq.write_table(table, metadata / f"{part:08d}.parquet")
    overrides = [
        f"output_dir={tmp_path / 'runs'}",
        f"source.path={metadata}",
        "ray.dashboard=false",
        "download.image_size=64",
        "download.samples_per_shard=100",
        "download.min_image_size=16",
        "download.thread_count=16",
        "filter.strategy=[{name: dedupe}, {name: basic, min_image_side: 32},"
        " {name: rank, column: clip_l14_similarity_score, top_fraction: 0.5}]",
        "subset.samples_per_shard=100",
        "train.model=demo-tiny",
        "train.samples_seen=64",
        "train.batch_size=32",
        "train.workers=1",
        "train.use_gpu=false",
        "train.warmup=1",
        "train.checkpoint_every_samples=64",
    ]
    recipe = load_recipe("datacomp_small", overrides)
    result = run_pipeline(recipe, run_name="mini", log=lambda m: None)
    m = result.manifests
    assert list(m) == ["download", "phash", "dedupe", "filter", "subset", "train"]
    assert m["download"].in_count == n
    for manifest in m.values():
        manifest.check_balance()
    assert m["filter"].dropped.get("basic:caption_length", 0) + m["filter"].dropped.get("basic:language", 0) > 0
    assert m["filter"].dropped["clip_l14_similarity_score"] > 0
    assert m["subset"].kept == m["filter"].kept and m["train"].metrics["samples_seen"] == 64

    shards = Path(m["download"].outputs["shards_dir"])
    downloaded = pq.read_table(sorted(shards.glob("*.parquet"))[0])
    expected = dict(zip([f"{i:032x}" for i in range(n)], scores.tolist(), strict=True))
    uids = downloaded.column("uid").to_pylist()
    assert set(uids) <= set(expected)  # DataComp's own uids, not recomputed ones
    assert downloaded.column("clip_l14_similarity_score").to_pylist() == pytest.approx([expected[u] for u in uids])
    assert "source_sha256" in downloaded.column_names  # beside img2dataset's own sha256 of the bytes

    decisions = read_decisions(m["filter"].outputs["decisions"])
    kept = sorted(u for u, k in zip(decisions["uid"].to_pylist(), decisions["keep"].to_pylist(), strict=True) if k)
    listed = np.load(m["filter"].outputs["kept_uids"])
    assert listed.dtype == np.dtype("u8,u8") and len(listed) == len(kept) == m["filter"].kept
    assert listed.tolist() == [(int(u[:16], 16), int(u[16:], 16)) for u in kept]  # DataComp's own conversion

    pool = build_pool_table(shards)
    again = FilterConfig.model_validate({"strategy": [{"name": "uid_list", "path": m["filter"].outputs["kept_uids"]}]})
    manifest, _ = run_filter(pool, again, tmp_path / "again")
    assert manifest.kept == len(kept) and manifest.dropped == {"uid_list:not_listed": pool.num_rows - len(kept)}
    assert (tmp_path / "again" / "kept_uids.npy").read_bytes() == Path(m["filter"].outputs["kept_uids"]).read_bytes()
