"""One pipeline run against real services: an `mlflow server` on PostgreSQL 15 and a token-authenticated
`ray start --head` with its dashboard, read back through `MlflowClient` and looked at in Chromium.

Everything listens on 127.0.0.1 only, on free ports, with its files in its own temp dir; the
expensive parts (PostgreSQL, the MLflow server, the Ray head, the run) are module fixtures, so
one run serves both tests.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark
from tests.browser import VIEWPORT, chromium, screenshot
from tests.conftest import small_demo_overrides

STAGES = ["demo_pool", "download", "phash", "train"]
EXPERIMENT = "demo"  # the recipe's name
RUN_NAME = "seen"
PG_USER = "mlflow"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen | None, seconds: float, log: Path | None = None) -> None:
    """Until `url` answers at all (any HTTP status); fails with the log's tail if the process ends first."""
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (a 401 is an answer)
        except OSError:
            if time.time() > deadline or (process is not None and process.poll() is not None):
                tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
                pytest.fail(f"{url} did not answer within {seconds:.0f} s\n{tail}")
            time.sleep(0.5)


# --- PostgreSQL ----------------------------------------------------------------------------------


def _pg_program(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} not found (on PATH or /usr/lib/postgresql/*/bin): apt-get install postgresql")
    return str(found)


def _unprivileged_user() -> pwd.struct_passwd | None:
    """initdb and postgres refuse to run as root: as root, run them as the `postgres` user Debian's
    package creates (or `nobody`); otherwise as ourselves (None)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.fail("running as root, and no unprivileged user (postgres, nobody) to run PostgreSQL as")


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str
    database: str = "mlflow"
    user: str = PG_USER

    @property
    def uri(self) -> str:
        """SQLAlchemy URI without the password (that goes in PGPASSWORD). `+psycopg2`: the driver the
        `test` extra installs (SQLAlchemy 2.1 takes a bare `postgresql://` to mean psycopg 3)."""
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def connect(self, database: str | None = None):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=database or self.database
        )


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster in a temp dir: TCP on 127.0.0.1 only (password auth), its unix
    socket inside the temp dir, stopped with `pg_ctl stop` (SIGKILL if that fails) and removed."""
    user = _unprivileged_user()
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # not under pytest's 0700 root-owned tmp dirs
    data, sockets, password = root / "data", root / "sockets", secrets.token_hex(16)
    sockets.mkdir()
    (root / "pwfile").write_text(password)
    if user:
        for path in (root, sockets, root / "pwfile"):
            os.chown(path, user.pw_uid, user.pw_gid)
    env = {**os.environ, "LC_ALL": "C", "HOME": str(root)}
    pg_ctl = [_pg_program("pg_ctl"), "-D", str(data)]
    try:
        initdb = subprocess.run(
            [_pg_program("initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={root / 'pwfile'}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"],
            cwd=root, env=env, capture_output=True, text=True, timeout=120, **as_user,
        )  # fmt: skip
        (root / "pwfile").unlink()
        assert initdb.returncode == 0, initdb.stdout[-2000:] + initdb.stderr[-2000:]
        port = _free_port()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{sockets}'",
            "fsync": "off",  # a throwaway cluster
        }
        with (data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        started = subprocess.run(
            [*pg_ctl, "-l", str(root / "server.log"), "-w", "-t", "60", "start"],
            cwd=root, env=env, capture_output=True, text=True, timeout=90, **as_user,
        )  # fmt: skip
        log = root / "server.log"
        assert started.returncode == 0, started.stderr + (log.read_text()[-2000:] if log.exists() else "")
        server = Postgres(port=port, password=password)
        admin = server.connect("postgres")
        admin.autocommit = True  # CREATE DATABASE cannot run in a transaction
        admin.cursor().execute(f"CREATE DATABASE {server.database}")  # a constant name, not data
        admin.close()
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            stopped = subprocess.run(
                [*pg_ctl, "-m", "fast", "-w", "-t", "30", "stop"],
                cwd=root, env=env, capture_output=True, timeout=60, **as_user,
            )  # fmt: skip
            if stopped.returncode != 0 and (data / "postmaster.pid").exists():
                with suppress(OSError, ValueError):
                    os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


# --- MLflow server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowServer:
    url: str
    artifacts: Path  # --artifacts-destination: where the server stores what clients upload
    process: subprocess.Popen
    log: Path

    def wait_until_up(self, seconds: float = 180) -> None:
        _wait_for_http(f"{self.url}/health", self.process, seconds, self.log)


@contextmanager
def mlflow_server(store: Postgres, folder: Path) -> Iterator[MlflowServer]:
    """`mlflow server` with PostgreSQL as its backend store and proxied artifacts in a local folder.
    Yields as soon as it is started (it takes a while to migrate the database and import its app;
    start the next thing meanwhile, then `wait_until_up`)."""
    port, artifacts, log = _free_port(), folder / "artifacts", folder / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PGPASSWORD"] = store.password  # libpq reads it: the password stays off the command line
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner (its huey store in /dev/shm)
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", store.uri, "--serve-artifacts", "--artifacts-destination", str(artifacts)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder,
            start_new_session=True,  # the server forks workers: stop the whole group
        )  # fmt: skip
    try:
        yield MlflowServer(url=f"http://127.0.0.1:{port}", artifacts=artifacts, process=server, log=log)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# --- Ray head ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayHead:
    address: str  # GCS, for `--address`
    dashboard: str  # http://127.0.0.1:PORT
    home: Path  # the operator's home: ~/.ray/auth_token holds the cluster's token
    token: str


def _operator_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_"))}
    path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return {**env, "HOME": str(home), "PATH": path, "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}


@contextmanager
def ray_head(home: Path) -> Iterator[RayHead]:
    """`ray start --head` as an operator would, with a token in ~/.ray/auth_token (so Ray 2.60 turns
    token authentication on) and its dashboard; loopback only, its own temp dir, killed by that dir
    (`ray stop` would also stop the suite's own Ray)."""
    ray = str(Path(sys.executable).with_name("ray"))
    env = _operator_env(home)
    made = subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    temp_dir = tempfile.mkdtemp(prefix="rts", dir="/tmp")  # socket paths are length-limited
    port, dashboard = _free_port(), _free_port()
    try:
        started = subprocess.run(
            [ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr[-3000:]
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_http(f"{url}/api/authentication_mode", None, 60)
        token = (home / ".ray" / "auth_token").read_text().strip()
        yield RayHead(address=f"127.0.0.1:{port}", dashboard=url, home=home, token=token)
    finally:
        load_benchmark("soak").kill_ray_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# --- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    dir: Path
    console: str
    tracking: MlflowServer
    postgres: Postgres
    head: RayHead


def run_pipeline_cli(head: RayHead, tracking: MlflowServer, output: Path) -> subprocess.CompletedProcess:
    """`python -m pipeline run demo --address <head>` with MLFLOW_TRACKING_URI set: a tiny chain that
    fans out named tasks (download, phash) and trains 2 steps with a checkpoint each."""
    overrides = [
        *[o for o in small_demo_overrides(output) if not o.startswith("stages=")],
        f"stages=[{', '.join(STAGES)}]",
        "train.samples_seen=64",
        "train.batch_size=32",
        "train.checkpoint_every_samples=32",
        "train.log_every_steps=1",
        "train.workers=1",  # Ray Train starts one worker faster than two; the curve is the same shape
    ]
    args = [sys.executable, "-m", "pipeline", "run", "demo", "--address", head.address, "--run-name", RUN_NAME]
    args += [a for o in overrides for a in ("--set", o)]
    env = {**_operator_env(head.home), "MLFLOW_TRACKING_URI": tracking.url}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[tuple[Postgres, MlflowServer, RayHead]]:
    with (
        postgres_server() as store,
        mlflow_server(store, tmp_path_factory.mktemp("mlflow")) as tracking,
        ray_head(tmp_path_factory.mktemp("operator")) as head,  # while the MLflow server starts
    ):
        tracking.wait_until_up()
        yield store, tracking, head


@pytest.fixture(scope="module")
def tracked_run(services, tmp_path_factory) -> Run:
    store, tracking, head = services
    output = tmp_path_factory.mktemp("runs")
    done = run_pipeline_cli(head, tracking, output)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Run(dir=output / RUN_NAME, console=done.stdout + done.stderr, tracking=tracking, postgres=store, head=head)


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_on_a_postgres_backed_tracking_server_reads_back_its_tree_curve_and_checkpoint(tracked_run, tmp_path):
    """Through `MlflowClient` on the server's URL: the parent run and one stage run per stage linked by
    `mlflow.parentRunId`, the training curve as the run folder has it, and the final checkpoint,
    downloaded through the server's artifact proxy, loading with `weights_only=True`."""
    import mlflow
    import torch

    assert f"MLflow: {tracked_run.tracking.url} (experiment '{EXPERIMENT}')" in tracked_run.console  # from the env
    client = mlflow.MlflowClient(tracked_run.tracking.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in parents] == [RUN_NAME]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert json.loads((tracked_run.dir / "run.json").read_text())["mlflow_run_id"] == parent.info.run_id
    stages = {r.data.tags.get("stage"): r for r in runs if r is not parent}
    assert sorted(stages) == sorted(STAGES)
    for stage, run in stages.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert run.info.status == "FINISHED", stage
    kept = json.loads((tracked_run.dir / "download" / "manifest.json").read_text())["kept"]
    assert stages["download"].data.metrics["accounting/kept"] == kept

    # the store is really the PostgreSQL database: the same runs, read with SQL
    with tracked_run.postgres.connect() as db, db.cursor() as cursor:
        cursor.execute("SELECT name FROM runs WHERE experiment_id = %s", (int(experiment.experiment_id),))
        assert sorted(name for (name,) in cursor.fetchall()) == sorted([RUN_NAME, *STAGES])
    db.close()

    train = stages["train"].info.run_id
    history = client.get_metric_history(train, "train/loss")
    logged = [json.loads(line) for line in (tracked_run.dir / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    assert all(math.isfinite(m.value) and m.value > 0 for m in history)
    assert {m.step: m.value for m in history} == pytest.approx({e["step"]: e["loss"] for e in logged})

    folders = [a.path for a in client.list_artifacts(train, "checkpoints")]
    assert folders == ["checkpoints/step_00000002"], folders
    local = Path(client.download_artifacts(train, folders[0], str(tmp_path)))
    info = json.loads((local / "train_state.json").read_text())
    assert info["step"] == 2 and (local / "state.pt").stat().st_size == info["state_bytes"]
    state = torch.load(local / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and any(k.startswith("visual.") for k in state["model"])
    stored = list(tracked_run.tracking.artifacts.rglob("step_00000002/state.pt"))
    assert len(stored) == 1  # uploaded through the server into its --artifacts-destination


def _driver_job(head: RayHead) -> dict:
    """The Ray job of the pipeline run: the driver that joined the head with our run name."""
    request = urllib.request.Request(f"{head.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        jobs = json.load(answer)
    ours = [j for j in jobs if "pipeline run demo" in (j.get("entrypoint") or "") and RUN_NAME in j["entrypoint"]]
    assert len(ours) == 1, jobs
    return ours[0]


@pytest.mark.slow
def test_seen_in_a_browser_mlflow_runs_and_loss_chart_and_ray_tasks_named_by_stage(tracked_run, tmp_path):
    """What a person sees in headless Chromium (Debian's, driven by playwright).

    MLflow UI: the experiment's runs table lists the parent run; expanding it shows its stage runs
    (nested by `mlflow.parentRunId`); the train run's "Model metrics" tab, searched for
    `train/loss`, draws that curve with one point per step. MLflow 3.17's UI opens an experiment in
    the view its GenAI / Model training switch (top left) was last on, GenAI for a fresh browser,
    whatever the experiment's `mlflow.experimentKind` tag says: the test opens the links a person
    gets after clicking "Model training" (`?workflowType=machine_learning`).

    Ray dashboard: with token authentication on (Ray 2.60's default) the dashboard first shows an
    "Authentication Token Required" dialog. A person pastes the token there (`ray get-auth-token` on
    the head prints it; it is the file `~/.ray/auth_token`) and presses Enter: the page posts it to
    `/api/authenticate`, which sets the `ray-authentication-token` cookie for later visits. (A
    script may instead send `Authorization: Bearer <token>` with each request.) The test does what
    the person does, opens the run's job from the Jobs view, and filters its Task Table by name:
    the pipeline's tasks carry their stage's name (`download:0` ... `phash:3`).

    Screenshots go to the test's tmp dir, and also to $SCREENSHOTS_DIR when set; the README's come from
    `SCREENSHOTS_DIR=docs/screenshots .venv/bin/python -m pytest tests/test_tracking_server.py`.
    """
    import mlflow
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    client = mlflow.MlflowClient(tracked_run.tracking.url)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = {r.data.tags.get("stage", "parent"): r for r in client.search_runs([experiment])}
    steps = len(client.get_metric_history(runs["train"].info.run_id, "train/loss"))
    # how many tasks each fanning-out stage ran, as the run folder says (`pipeline status` reads the same)
    parts = {s: json.loads((tracked_run.dir / s / "progress.json").read_text())["total"] for s in ("download", "phash")}
    assert parts == {"download": 4, "phash": 4}  # 160 samples in shards of 50
    mlflow_ui = f"{tracked_run.tracking.url}/#/experiments/{experiment}"
    machine_learning = "?workflowType=machine_learning"
    job = _driver_job(tracked_run.head)

    with chromium() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60_000)  # a first load on 2 busy cores

        # MLflow: the runs table, the parent run collapsed, then expanded into its stage runs
        printed = f"{mlflow_ui}/runs{machine_learning}"
        assert f"MLflow: {tracked_run.tracking.url} (experiment '{EXPERIMENT}'): {printed}" in tracked_run.console
        page.goto(printed)  # the link the run printed
        grid = page.get_by_role("grid")
        parent = grid.get_by_role("gridcell").filter(has=page.get_by_text(RUN_NAME, exact=True))
        expect(parent).to_be_visible()
        expect(page.get_by_text(f"{len(runs)} matching runs")).to_be_visible()
        expect(grid.get_by_text("train", exact=True)).to_have_count(0)  # nested: hidden until expanded
        parent.get_by_role("button").first.click()  # the +/- beside the run's name
        for stage in STAGES:
            expect(grid.get_by_role("link", name=stage, exact=True)).to_be_visible()
        assistant = page.get_by_role("button", name="Close")  # MLflow 3.17's Assistant side panel, if shown
        if assistant.count():
            assistant.first.click()
        screenshot(page, shots, "mlflow-runs")

        # MLflow: the train run's loss curve
        page.goto(f"{mlflow_ui}/runs/{runs['train'].info.run_id}/model-metrics{machine_learning}")
        page.get_by_placeholder("Search metric charts").fill("train/loss")
        card = page.get_by_test_id("experiment-view-compare-runs-card")
        expect(card).to_have_count(1)
        expect(card.get_by_text("loss", exact=True)).to_be_visible()
        expect(card.locator(".scatterlayer .trace path.point")).to_have_count(steps)  # one point per step
        screenshot(page, shots, "mlflow-train-loss")

        # Ray dashboard: the token dialog, the Jobs view, the job's Task Table by name
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60_000)
        page.goto(f"{tracked_run.head.dashboard}/#/jobs")
        dialog = page.get_by_role("dialog", name="Authentication Token Required")
        dialog.get_by_role("textbox", name="Authentication Token").fill(tracked_run.head.token)
        page.keyboard.press("Enter")
        expect(dialog).to_be_hidden()
        page.get_by_role("link", name=job["job_id"], exact=True).first.click()
        expect(page.get_by_text("pipeline run demo", exact=False).first).to_be_visible()
        page.get_by_text("Task Table", exact=True).click()  # collapsed at first
        name_filter = page.get_by_role("combobox", name="Name", exact=True).first  # the task table's
        for stage, n in parts.items():
            name_filter.fill(f"{stage}:")
            for i in range(n):
                expect(page.get_by_role("cell", name=f"{stage}:{i}", exact=True)).to_be_visible()
            expect(page.get_by_role("cell", name=f"{stage}:{n}", exact=True)).to_have_count(0)
        name_filter.fill("download:")
        page.keyboard.press("Escape")  # close the filter's suggestions
        page.mouse.move(0, VIEWPORT["height"] - 1)  # no tooltip over the table
        last_row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="download:0", exact=True))
        last_row.evaluate("e => e.scrollIntoView({block: 'end'})")  # the filtered table, whole
        screenshot(page, shots, "ray-dashboard-tasks")
