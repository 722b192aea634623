"""A Ray worker process killed mid-stage (by pid, SIGKILL): the stage recovers and every uid is counted once."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.embed import EmbedConfig, read_embedding_tables, run_embed
from stages.shards import expected_samples, read_tar_samples
from tests.processes import kill_when, run_in_thread

pytestmark = pytest.mark.slow


def test_killed_embed_actor_is_replaced_and_every_uid_is_embedded_once(ray_cluster, pool_shards, tiny_model, tmp_path):
    shards_dir, download = pool_shards
    stage = tmp_path / "embed"
    config = EmbedConfig(batch_size=8, actors=1)
    thread, outcome = run_in_thread(run_embed, shards_dir, config, stage, tiny_model)
    kill_when(lambda: True, "Embedder")
    thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    manifest = outcome["result"]
    manifest.check_balance()
    assert manifest.in_count == download.kept
    uids = read_embedding_tables(stage / "embeddings").column("uid").to_pylist()
    expected = {u for t in shards_dir.glob("*.tar") for u in expected_samples(t).column("uid").to_pylist()}
    assert len(uids) == len(set(uids)) and set(uids) == expected


def test_killed_download_task_is_retried_and_no_uid_is_lost_or_doubled(ray_cluster, served_pool, tmp_path):
    from pipeline.executor import make_ray_map
    from pipeline.serve import serve_directory
    from stages.download import DownloadConfig, run_download

    pool_dir, base_url = served_pool
    source = pq.read_table(pool_dir / "source.parquet")
    with serve_directory(pool_dir / "files", slow_seconds=0.05) as slow_url:  # slow enough to be caught mid-part
        urls = [u.replace(base_url, f"{slow_url}/slow") for u in source.column("url").to_pylist()]
        table = source.set_column(source.column_names.index("url"), "url", pa.array(urls))
        pq.write_table(table, tmp_path / "source.parquet")
        config = DownloadConfig(image_size=32, samples_per_shard=100, min_image_size=16, thread_count=4, timeout=5)
        stage = tmp_path / "download"
        thread, outcome = run_in_thread(
            lambda: run_download(str(tmp_path / "source.parquet"), config, stage, map_fn=make_ray_map())
        )
        kill_when(lambda: True, "ray::download:")  # as soon as a shard's task runs (tasks are named stage:item)
        thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    manifest = outcome["result"]
    manifest.check_balance()
    assert manifest.in_count == source.num_rows
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((stage / "shards").glob("*.parquet"))])
    assert sorted(rows.column("url").to_pylist()) == sorted(urls)  # each input row once
    statuses = zip(rows.column("uid").to_pylist(), rows.column("status").to_pylist(), strict=True)
    success = [uid for uid, status in statuses if status == "success"]
    in_tars = []
    for tar in (stage / "shards").glob("*.tar"):
        in_tars += sorted({key for key, _ in read_tar_samples(tar)})
    assert sorted(in_tars) == sorted(success) and len(in_tars) == len(set(in_tars)) == manifest.kept
