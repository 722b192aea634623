"""A real multi-node Ray cluster on one machine: a head with no CPUs and two worker nodes, each a
raylet of its own started by `ray start`. The shard-level work must land on the worker nodes and
count exactly as on one node; a worker node killed mid-stage must cost nothing but time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import load_recipe
from pipeline.orchestrator import run_pipeline
from tests.benchmark_modules import load_benchmark
from tests.conftest import small_demo_overrides
from tests.test_cluster import _env, _free_port, _ray

STAGES = "stages=[demo_pool, download, phash, dedupe, subset]"
WORKERS = ("node_a", "node_b")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(GCS address, dashboard URL, the operator's home, the head's temp dir); worker nodes tagged by
    a custom resource each, so a test can find (and kill) one."""
    home = tmp_path_factory.mktemp("operator")
    assert _ray("get-auth-token", "--generate", home=home).returncode == 0
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # socket paths are length-limited
    port, dashboard = _free_port(), _free_port()
    head = _ray(
        *("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0"),
        *("--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"),
        f"--dashboard-agent-listen-port={_free_port()}",
        *(f"--temp-dir={temp_dir}", "--disable-usage-stats"),
        home=home,
    )
    try:
        assert head.returncode == 0, head.stderr
        for name in WORKERS:
            worker = _ray(
                *("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1"),
                f"--resources={json.dumps({name: 1})}",
                f"--dashboard-agent-listen-port={_free_port()}",
                "--disable-usage-stats",
                home=home,
                token=True,
            )
            assert worker.returncode == 0, worker.stderr
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", home, temp_dir
    finally:
        load_benchmark("soak").kill_ray_of(temp_dir)  # only this cluster: `ray stop` would take the suite's Ray too
        shutil.rmtree(temp_dir, ignore_errors=True)


def _get(url: str, home: Path) -> dict:
    token = (home / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]["result"]


def _worker_node_ids(dashboard: str, home: Path) -> dict[str, str]:
    nodes = _get(f"{dashboard}/api/v0/nodes?limit=100&detail=1", home)["result"]
    return {
        name: n["node_id"] for n in nodes for name in WORKERS if name in n["resources_total"] and n["state"] == "ALIVE"
    }


def _task_nodes(dashboard: str, home: Path) -> dict[str, set[str]]:
    """The nodes each stage's finished tasks ran on, by stage (tasks are named `<stage>:<item>`)."""
    tasks = _get(f"{dashboard}/api/v0/tasks?limit=10000&detail=1", home)["result"]
    nodes: dict[str, set[str]] = {}
    for task in tasks:
        if task["state"] == "FINISHED" and ":" in task["name"]:
            nodes.setdefault(task["name"].split(":")[0], set()).add(task["node_id"])
    return nodes


def _run(address: str, home: Path, output: Path, name: str, port: int) -> subprocess.Popen:
    """`pipeline run demo --address` in its own process, as a user on the head runs it."""
    overrides = [*_overrides(output), f"source.demo.port={port}"]
    args = [sys.executable, "-m", "pipeline", "run", "demo", "--address", address, "--run-name", name]
    args += [a for o in overrides for a in ("--set", o)]
    output.mkdir(parents=True, exist_ok=True)
    log = open(output / f"{name}.log", "w")  # noqa: SIM115 (the process writes it; closed when the test ends)
    return subprocess.Popen(args, env=_env(home), stdout=log, stderr=subprocess.STDOUT)


def _overrides(output: Path) -> list[str]:
    # a fifth of the urls answer after 4 s (well within the 10 s timeout): every part takes 4 s or more, long
    # enough to be seen running (the state API lags by a second or so) and killed while it runs
    return [
        *small_demo_overrides(output),
        STAGES,
        "download.samples_per_shard=40",
        "subset.samples_per_shard=30",
        "source.demo.defects.slow=0.2",
        "source.demo.slow_seconds=4",
        "download.timeout=10",
        "dedupe.map_rows=100",  # the demo pool fits one map task, which runs in the driver: make it shuffle
        "dedupe.partition_entries=200",
    ]


def _counts(run_dir: Path) -> dict[str, tuple]:
    manifests = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/manifest.json")}
    return {stage: (m["in"], m["kept"], m["dropped"], m["failed"]) for stage, m in manifests.items()}


def _subset_uids(run_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    tables = sorted((run_dir / "subset" / "shards").glob("*.parquet"))
    return [uid for table in tables for uid in pq.read_table(table, columns=["uid"]).column("uid").to_pylist()]


@pytest.fixture(scope="module")
def one_node(ray_cluster, tmp_path_factory):
    """The same run on the suite's single-node Ray: what the cluster's runs must equal."""
    output = tmp_path_factory.mktemp("one_node")
    port = _free_port()  # the demo's uids name its server's port: every run serves the same urls
    recipe = load_recipe("demo", [*_overrides(output), f"source.demo.port={port}"])
    return run_pipeline(recipe, run_name="one", log=lambda m: None).run_dir, port


@pytest.mark.slow
def test_shard_tasks_run_on_the_worker_nodes_and_count_as_on_one_node(cluster, one_node, tmp_path):
    address, dashboard, home, _ = cluster
    reference, port = one_node
    output = tmp_path / "runs"
    code = _run(address, home, output, "spread", port).wait(timeout=300)
    run_dir = output / "spread"
    assert code == 0, (output / "spread.log").read_text()[-3000:]
    workers = set(_worker_node_ids(dashboard, home).values())
    assert len(workers) == 2
    ran_on = _task_nodes(dashboard, home)
    # reading the table, finding duplicate rows, downloading, hashing, the dedupe shuffle, copying: all ran
    # as tasks (on the worker nodes, the only ones with CPUs)
    for stage in ("download/source/read", "download/source/duplicates", "download", "phash", "dedupe", "subset"):
        assert ran_on.get(stage), (stage, ran_on)
    assert ran_on["download"] == workers  # 4 parts of 4 s or more over two one-CPU nodes: both took some
    assert _counts(run_dir) == _counts(reference)
    assert _subset_uids(run_dir) == _subset_uids(reference)


def _raylet_of(resource: str) -> int:
    """The pid of the raylet of the worker node tagged with `resource`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command and command[0].endswith(b"/raylet") and any(resource.encode() in part for part in command):
            return int(pid)
    raise AssertionError(f"no raylet with {resource}")


@pytest.mark.slow
def test_a_worker_node_killed_mid_download_costs_time_not_samples(cluster, one_node, tmp_path):
    """SIGKILL to one worker node's raylet while it runs a download task: the task is retried on the
    other node, and the run ends with every uid exactly once and the single-node counts."""
    address, dashboard, home, _ = cluster
    reference, port = one_node
    output = tmp_path / "runs"
    victim = _worker_node_ids(dashboard, home)[WORKERS[0]]
    started_ms = time.time() * 1000
    run = _run(address, home, output, "lossy", port)
    deadline = time.time() + 120
    while victim not in _running(dashboard, home, "download", started_ms):
        assert run.poll() is None and time.time() < deadline, (output / "lossy.log").read_text()[-3000:]
        time.sleep(0.2)
    os.kill(_raylet_of(WORKERS[0]), signal.SIGKILL)
    killed_ms = time.time() * 1000
    assert run.wait(timeout=300) == 0, (output / "lossy.log").read_text()[-3000:]
    run_dir = output / "lossy"
    assert _counts(run_dir) == _counts(reference)
    uids = [uid for tar in sorted((run_dir / "download" / "shards").glob("*.tar")) for uid in _tar_keys(tar)]
    assert len(uids) == len(set(uids)) == _counts(reference)["download"][1]
    assert _subset_uids(run_dir) == _subset_uids(reference)
    while WORKERS[0] in _worker_node_ids(dashboard, home):  # the cluster notices the node is gone
        assert time.time() < deadline + 60
        time.sleep(1)
    tasks = _get(f"{dashboard}/api/v0/tasks?limit=10000&detail=1", home)["result"]
    lost = [t["name"] for t in tasks if t["node_id"] == victim and t["state"] == "FAILED"]
    assert lost, [(t["name"], t["state"]) for t in tasks if t["node_id"] == victim]  # the kill hit work in flight
    after = {t["node_id"] for t in tasks if t["state"] == "FINISHED" and (t.get("start_time_ms") or 0) > killed_ms}
    assert after == {_worker_node_ids(dashboard, home)[WORKERS[1]]}  # what ran after the kill ran on the node left


def _running(dashboard: str, home: Path, stage: str, since_ms: float) -> set[str]:
    """The nodes running one of `stage`'s tasks, started after `since_ms` (an earlier run's are not this
    one's) and less than 2.5 s ago (a part takes 4 s or more: it is still running)."""
    tasks = _get(f"{dashboard}/api/v0/tasks?limit=10000&detail=1&filter_keys=state&filter_values=RUNNING", home)
    now_ms = time.time() * 1000
    return {
        t["node_id"]
        for t in tasks["result"]
        if t["name"].startswith(f"{stage}:") and (t.get("start_time_ms") or 0) > max(since_ms, now_ms - 2500)
    }


def _tar_keys(tar: Path) -> list[str]:
    from stages.shards import read_tar_samples

    return [key for key, _ in read_tar_samples(tar)]
