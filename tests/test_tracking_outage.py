"""MLflow unreachable, at the start or mid-run: the run finishes, the user is told, sync replays it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from pipeline.config import load_recipe
from pipeline.orchestrator import run_pipeline
from pipeline.sync import sync_run
from stages.train import Train
from tests.conftest import small_demo_overrides


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stage_runs(uri: str, experiment: str) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.info.run_name: r for r in runs if r.data.tags.get("stage")}


def test_unreachable_store_at_start_runs_anyway_and_sync_replays_the_folder(ray_cluster, tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    overrides = [
        *small_demo_overrides(tmp_path / "runs"),
        "stages=[demo_pool, download, phash]",
        f"tracking.uri={dead}",
    ]
    recipe = load_recipe("demo", overrides)
    messages: list[str] = []
    started = time.perf_counter()
    result = run_pipeline(recipe, run_name="offline", log=messages.append)
    assert time.perf_counter() - started < 120  # fails fast, not after MLflow's default retry schedule
    assert result.mlflow_run_id is None and list(result.manifests) == ["demo_pool", "download", "phash"]
    told = [m for m in messages if m.startswith(f"MLflow at {dead} failed")]
    assert len(told) == 1, messages  # said once, not once per call
    assert any("python -m pipeline sync" in m for m in messages)
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["mlflow_problem"] and record["mlflow_run_id"] is None

    with pytest.raises(ConnectionError, match="still unreachable"):
        sync_run(result.run_dir, log=lambda m: None)
    store = f"sqlite:///{tmp_path / 'later.db'}"
    parent, logged = sync_run(result.run_dir, store, log=lambda m: None)
    assert logged == ["demo_pool", "download", "phash"]
    runs = _stage_runs(store, "demo")
    assert runs["download"].data.metrics["accounting/kept"] == result.manifests["download"].kept
    assert runs["phash"].data.tags["mlflow.parentRunId"] == parent
    assert json.loads((result.run_dir / "run.json").read_text())["mlflow_run_id"] == parent


@pytest.mark.slow
def test_tracking_server_killed_mid_training_does_not_stop_the_run(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once: the test is about what follows
    port = _free_port()
    store_args = ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    # one worker and no GenAI job runner: up in ~11 s instead of ~23 s on 2 cores, as in test_tracking_server
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         *store_args, "--default-artifact-root", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # the server forks workers: kill the whole group
    )  # fmt: skip
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("the MLflow server did not start")
                time.sleep(0.5)
        real = Train.run

        def train_after_outage(self, ctx, inputs):
            os.killpg(server.pid, signal.SIGKILL)  # the server dies just as training starts
            server.wait()
            return real(self, ctx, inputs)

        monkeypatch.setattr(Train, "run", train_after_outage)
        overrides = [
            *[o for o in small_demo_overrides(tmp_path / "runs") if not o.startswith("stages=")],
            "stages=[demo_pool, download, train]",
            f"tracking.uri=http://127.0.0.1:{port}",
            "train.samples_seen=64",
            "train.batch_size=32",
            "train.checkpoint_every_samples=32",
            "train.log_every_steps=1",
            "subset.samples_per_shard=60",
        ]
        messages: list[str] = []
        result = run_pipeline(load_recipe("demo", overrides), run_name="outage", log=messages.append)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert result.manifests["train"].metrics["steps"] == 2
    assert any("failed" in m and f"127.0.0.1:{port}" in m for m in messages)
    live = _stage_runs(f"sqlite:///{tmp_path / 'server.db'}", "demo")
    assert {"demo_pool", "download"} <= set(live)  # logged before the outage
    assert "accounting/kept" not in live["train"].data.metrics  # nothing after it

    store = f"sqlite:///{tmp_path / 'later.db'}"
    sync_run(result.run_dir, store, log=lambda m: None)
    train = _stage_runs(store, "demo")["train"]
    history = mlflow.MlflowClient(store).get_metric_history(train.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]  # the training curve, replayed from train_log.jsonl
    assert train.data.metrics["accounting/kept"] == result.manifests["train"].kept


def test_a_new_sqlite_store_is_a_seeded_copy_that_mlflow_reads_as_its_own(tmp_path, monkeypatch):
    """A new run folder's store is copied from an empty one MLflow made once; MLflow checks its schema
    on open, and the Default experiment is what MLflow would have made here."""
    import sqlite3

    import mlflow

    from stages.mlflow_sink import MlflowSink, cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "own.db"
    mlflow.MlflowClient(f"sqlite:///{own}").search_experiments()  # MLflow's own creation, for comparison
    sink = MlflowSink(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert sink.online and list(cache_dir().glob("mlflow-*-empty.db"))
    experiment = sink.call("create_experiment", "seeded")
    run = sink.call("create_run", experiment).info.run_id
    sink.call("log_metric", run, "loss", 1.5, step=3)
    assert [m.value for m in sink.call("get_metric_history", run, "loss")] == [1.5]

    def rows(path, sql):
        with sqlite3.connect(path) as db:
            return db.execute(sql).fetchall()

    tables = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    assert rows(tmp_path / "runs" / "mlflow.db", tables) == rows(own, tables)
    version = "SELECT version_num FROM alembic_version"
    assert rows(tmp_path / "runs" / "mlflow.db", version) == rows(own, version)
    default = sink.call("get_experiment", "0")
    assert default.name == "Default" and default.artifact_location == str(tmp_path / "mlruns" / "0")
    # the Default experiment is stamped when the store is made, not when the template was
    (template,) = cache_dir().glob("mlflow-*-empty.db")
    with sqlite3.connect(template) as db:
        db.execute("UPDATE experiments SET creation_time = 0 WHERE experiment_id = 0")
    db.close()
    later = MlflowSink(f"sqlite:///{tmp_path / 'later.db'}").call("get_experiment", "0")
    assert abs(later.creation_time / 1000 - time.time()) < 60

    # a store that exists is never replaced
    before = (tmp_path / "runs" / "mlflow.db").read_bytes()
    MlflowSink(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert (tmp_path / "runs" / "mlflow.db").read_bytes() == before
