"""A Ray worker process killed mid-stage (by pid, SIGKILL): the stage recovers and every uid is counted once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.embed import EmbedConfig, read_embedding_tables, run_embed
from stages.shards import expected_samples, read_tar_samples
from stages.train import TrainConfig, latest_checkpoint, run_train

pytestmark = pytest.mark.slow


def _pids_running(marker: str) -> list[int]:
    """Processes whose command line (Ray sets it to `ray::<Actor>...`) contains `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _run_in_thread(fn, *args):
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _kill_when(condition, marker: str, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = _pids_running(marker)
        if pids and condition():
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(0.2)
    pytest.fail(f"no {marker} process to kill within {timeout}s")


def test_killed_train_worker_restarts_from_the_last_checkpoint(ray_cluster, pool_shards, tmp_path):
    shards_dir, download = pool_shards
    shards = sorted(str(p) for p in shards_dir.glob("*.tar"))
    config = TrainConfig(
        model="demo-tiny", samples_seen=32 * 8, batch_size=32, warmup=1, workers=1,
        checkpoint_every_samples=32 * 2, log_every_steps=1, shuffle_buffer=50, max_failures=2,
    )  # fmt: skip
    stage = tmp_path / "train"
    thread, outcome = _run_in_thread(run_train, shards, download.kept, config, stage)
    killed = _kill_when(lambda: latest_checkpoint(stage / "ray") is not None, "RayTrainWorker")
    thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    manifest = outcome["result"]
    assert manifest.metrics["steps"] == 8 and manifest.kept == download.kept
    steps = [json.loads(line)["step"] for line in (stage / "train_log.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, 9))  # steps after the restored checkpoint may be logged twice
    assert not Path(f"/proc/{killed}").exists()


def test_killed_embed_actor_is_replaced_and_every_uid_is_embedded_once(ray_cluster, pool_shards, tiny_model, tmp_path):
    shards_dir, download = pool_shards
    stage = tmp_path / "embed"
    config = EmbedConfig(batch_size=8, actors=1)
    thread, outcome = _run_in_thread(run_embed, shards_dir, config, stage, tiny_model)
    _kill_when(lambda: True, "Embedder")
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
        thread, outcome = _run_in_thread(
            lambda: run_download(str(tmp_path / "source.parquet"), config, stage, map_fn=make_ray_map())
        )
        _kill_when(lambda: True, "ray::download:")  # as soon as a shard's task runs (tasks are named stage:item)
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
