"""Joining a Ray cluster someone else started: a real `ray start --head`, token auth as Ray 2.60 has it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
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
    return {**env, "HOME": str(home), "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}


def _ray(*args: str, home: Path) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, *args], env=_env(home), capture_output=True, text=True, timeout=120)


@pytest.fixture
def token_head(tmp_path):
    """A head started as an operator would (`ray start --head`) with a token in its user's
    ~/.ray/auth_token, so Ray turns token authentication on; its own temp dir, loopback only."""
    home = tmp_path / "operator"
    home.mkdir()
    assert _ray("get-auth-token", "--generate", home=home).returncode == 0
    temp_dir = tempfile.mkdtemp(prefix="rth", dir="/tmp")  # socket paths are length-limited
    port = _free_port()
    started = _ray(
        *("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2"),
        *("--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"),
        home=home,
    )
    assert started.returncode == 0, started.stderr
    try:
        yield f"127.0.0.1:{port}", home
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
    address, operator_home = token_head
    joined = _run_demo(address, operator_home, tmp_path / "runs")  # the token is in ~/.ray/auth_token
    assert joined.returncode == 0, joined.stdout[-2000:] + joined.stderr[-2000:]
    assert "InvalidAuthToken" not in joined.stdout + joined.stderr
    assert (tmp_path / "runs").is_dir() and list((tmp_path / "runs").glob("*/download/manifest.json"))

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    refused = _run_demo(address, stranger, tmp_path / "refused")
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert "cannot connect to Ray at" in lines[-1] and "~/.ray/auth_token" in lines[-1], refused.stderr[-2000:]
    assert len(lines) <= 3, refused.stderr[-3000:]  # not a screen of Ray's retry warnings
