"""The command line as a user runs it: `python -m pipeline ...` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import small_demo_overrides


def cli(*args: str, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def test_list_shows_recipes_and_stages():
    out = cli("list")
    assert out.returncode == 0, out.stderr
    for name in ["demo", "laion_a", "datacomp_small", "datacomp_xlarge", "demo_pool", "download"]:
        assert name in out.stdout


def test_show_prints_the_resolved_recipe_with_overrides():
    out = cli("show", "datacomp_small", "--set", "download.image_size=128")
    assert out.returncode == 0, out.stderr
    assert "samples_seen: 12800000" in out.stdout
    assert "image_size: 128" in out.stdout


def test_dry_run_prints_the_plan_with_published_figures_and_touches_nothing(tmp_path):
    out = cli("run", "datacomp_xlarge", "--dry-run", "--set", f"output_dir={tmp_path / 'runs'}")
    assert out.returncode == 0, out.stderr
    for figure in ["12,800,000,000", "ViT-L-14", "90,112", "warmup 10,000", "lr 0.001", "download"]:
        assert figure in out.stdout
    assert not (tmp_path / "runs").exists()
    demo = cli("run", "demo", "--dry-run", "--set", f"output_dir={tmp_path / 'runs'}")
    assert "demo_pool" in demo.stdout and "1,000" in demo.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope"], "unknown recipe 'nope'"),
        (["run", "demo", "--set", "download.image_sz=64", "--dry-run"], "download.image_sz: unknown key"),
        (["run", "demo", "--set", "download.image_size=big", "--dry-run"], "download.image_size"),
        (["run", "demo", "--set", "stages=[demo_pool, embed]", "--dry-run"], "unknown stage 'embed'"),
        (["run", "demo", "--set", "stages=[demo_pool, train]", "--dry-run"], "'train' needs 'download' before it"),
        (["run", "laion_a", "--set", "output_dir=/proc/forbidden"], "cannot create run directory"),
        (["run", "demo", "--resume", "--set", "output_dir=/tmp/definitely-empty-xyz"], "cannot resume"),
    ],
)
def test_bad_input_gives_a_one_line_error_and_nonzero_exit(args, message):
    out = cli(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_unknown_option_is_rejected():
    out = cli("run", "demo", "--bogus")
    assert out.returncode == 2
    assert "No such option" in out.stderr


@pytest.mark.slow
def test_demo_runs_from_the_command_line(tmp_path):
    temp = tmp_path.parent / "rt-cli"  # Ray's socket paths must stay short
    overrides = small_demo_overrides(tmp_path / "runs") + [f"ray.temp_dir=/tmp/{temp.name}", "ray.num_cpus=2"]
    args = ["run", "demo"] + [x for o in overrides for x in ("--set", o)]
    out = cli(*args, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[demo_pool] in=160 kept=160" in out.stdout
    assert "[download] in=160 kept=" in out.stdout
    assert "done:" in out.stdout
