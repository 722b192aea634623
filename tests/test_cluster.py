"""Joining a Ray cluster someone else started: a real `ray start --head`, token auth as Ray 2.60 has it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark
from tests.conftest import small_demo_overrides


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # a job's `python` is the head's: this venv's
    return {**env, "HOME": str(home), "PATH": path, "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}


def _ray(*args: str, home: Path, token: bool = False) -> subprocess.CompletedProcess:
    """The `ray` CLI as the user of `home`; `token`: sending that user's token (RAY_AUTH_MODE=token)."""
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**_env(home), **({"RAY_AUTH_MODE": "token"} if token else {})}
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head started as an operator would (`ray start --head`) with a token in its user's
    ~/.ray/auth_token, so Ray turns token authentication on; its own temp dir, loopback only.
    Yields (GCS address, dashboard URL, the operator's home)."""
    home = tmp_path_factory.mktemp("operator")
    assert _ray("get-auth-token", "--generate", home=home).returncode == 0
    temp_dir = tempfile.mkdtemp(prefix="rth", dir="/tmp")  # socket paths are length-limited
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    started = _ray(
        *("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2"),
        *("--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"),
        # the job agent's own port: Ray's default (52365) is the suite's own Ray's when that one is up
        f"--dashboard-agent-listen-port={agent}",
        *(f"--temp-dir={temp_dir}", "--disable-usage-stats"),
        home=home,
    )
    assert started.returncode == 0, started.stderr
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", home
    finally:
        load_benchmark("soak").kill_ray_of(temp_dir)  # only this head: `ray stop` would take the suite's Ray too
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run_demo(address: str, home: Path, output: Path) -> subprocess.CompletedProcess:
    overrides = [*small_demo_overrides(output), "stages=[demo_pool, download]"]
    args = [sys.executable, "-m", "pipeline", "run", "demo", "--address", address]
    args += [a for o in overrides for a in ("--set", o)]
    return subprocess.run(args, env=_env(home), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_joining_a_token_authenticated_head_uses_the_token_or_says_how_in_one_line(token_head, tmp_path):
    address, _, operator_home = token_head
    joined = _run_demo(address, operator_home, tmp_path / "runs")  # the token is in ~/.ray/auth_token
    assert joined.returncode == 0, joined.stdout[-2000:] + joined.stderr[-2000:]
    assert "InvalidAuthToken" not in joined.stdout + joined.stderr
    assert (tmp_path / "runs").is_dir() and list((tmp_path / "runs").glob("*/download/manifest.json"))

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    started = time.monotonic()
    refused = _run_demo(address, stranger, tmp_path / "refused")
    assert refused.returncode != 0
    assert time.monotonic() - started < 20  # asked once, not after ray.init's ~20 s of retries
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert "cannot connect to Ray at" in lines[-1] and "~/.ray/auth_token" in lines[-1], refused.stderr[-2000:]
    assert "it wants a token and none was sent" in lines[-1] and len(lines[-1]) < 300, lines[-1]
    assert len(lines) <= 3, refused.stderr[-3000:]  # not a screen of Ray's retry warnings


def test_an_address_where_nothing_listens_fails_at_once_in_one_line(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    out = _run_demo(address, tmp_path, tmp_path / "runs")
    assert out.returncode != 0 and time.monotonic() - started < 20  # not after ray.init's ~20 s of retries
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert f"cannot connect to Ray at {address}: nothing listens there" in lines[-1], out.stderr[-2000:]
    assert len(lines) == 1, out.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # no run folder for a mistyped address


@pytest.mark.slow
def test_a_run_submitted_to_the_dashboard_address_is_a_ray_job_with_its_log(token_head, tmp_path):
    _, dashboard, operator_home = token_head
    runs = tmp_path / "runs"  # absolute: the job's driver writes here, on the head
    out = _run_demo(dashboard, operator_home, runs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = re.search(r"submitted as Ray Job (pipeline-demo-[0-9-]+)", out.stdout).group(1)
    assert "[download] in=160" in out.stdout  # the job's own console, followed from its log
    assert not [line for line in out.stdout.splitlines() if "(raylet)" in line or "pid=" in line]
    assert list(runs.glob("*/download/manifest.json"))
    status = _ray("job", "status", job_id, "--address", dashboard, home=operator_home, token=True)  # as an operator
    assert status.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    listed = _ray("job", "list", "--address", dashboard, home=operator_home, token=True)
    assert "'recipe': 'demo'" in listed.stdout and "python -m pipeline run demo --set" in listed.stdout, listed.stdout


def test_a_ray_the_run_starts_locally_has_no_preemption_watcher_and_polls_often_unless_the_user_asks(monkeypatch):
    from pipeline.runtime import HEALTH_CHECK, PREEMPTION_WATCHER, WORKER_ENV, local_worker_env

    monkeypatch.delenv(PREEMPTION_WATCHER, raising=False)
    monkeypatch.delenv(HEALTH_CHECK, raising=False)
    env = local_worker_env()
    assert env[PREEMPTION_WATCHER] == "0" and env[HEALTH_CHECK] == "0.2" and env.items() >= WORKER_ENV.items()
    assert {PREEMPTION_WATCHER, HEALTH_CHECK}.isdisjoint(WORKER_ENV)  # a cluster the run joins: Ray's and 1 s
    monkeypatch.setenv(PREEMPTION_WATCHER, "1")
    monkeypatch.setenv(HEALTH_CHECK, "2")
    assert local_worker_env()[PREEMPTION_WATCHER] == "1" and local_worker_env()[HEALTH_CHECK] == "2"


def test_a_job_is_submitted_again_while_the_heads_job_agent_starts():
    """The dashboard refuses jobs until its agent is up, seconds after `ray start --head` (the Ray
    Job test above met it): that refusal is retried, any other is raised at once."""
    from pipeline.jobs import submit_when_agent_is_up

    class StartingHead:  # Ray's JobSubmissionClient.submit_job as a new head answers it
        def __init__(self, refusals: int, error: str):
            self.calls, self.refusals, self.error = 0, refusals, error

        def submit_job(self, **job) -> str:
            self.calls += 1
            if self.calls <= self.refusals:
                raise RuntimeError(f"Request failed with status code 500: {self.error}")
            return job["submission_id"]

    lines: list[str] = []
    head = StartingHead(2, "No available agent to submit job, please try again later..")
    assert submit_when_agent_is_up(head, lines.append, pause=0, submission_id="pipeline-demo-1") == "pipeline-demo-1"
    assert head.calls == 3 and len(lines) == 1 and "retrying" in lines[0]
    never = StartingHead(10**6, "No available agent to submit job, please try again later..")
    with pytest.raises(RuntimeError, match="did not come up in 0 s.*--dashboard-agent-listen-port"):
        submit_when_agent_is_up(never, lines.append, wait_seconds=0.05, pause=0.01, submission_id="x")
    broken = StartingHead(1, "runtime_env: working_dir too large")
    with pytest.raises(RuntimeError, match="too large"):
        submit_when_agent_is_up(broken, lines.append, pause=0, submission_id="y")
    assert broken.calls == 1
