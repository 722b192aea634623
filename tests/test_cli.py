"""The command line as a user runs it: `python -m pipeline ...` in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def cli(*args: str, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env()
    )


def start_in_background(*args: str, output=None) -> subprocess.Popen:
    """`python -m pipeline ...` in its own process group, so a test can signal it and its children;
    what it prints goes to the file `output` (stdout and stderr together, as on a terminal)."""
    sink = open(output, "w") if output else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        stdout=sink,
        stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )


# what Ray, Ray Data, Ray Train, MLflow and Python's warnings print: none of it on a quiet console
NOISE = re.compile(r"\(raylet\)|pid=\d|\.cc:\d|\bINFO\b|WARNING|Warning|Traceback|TrainController|RayTrainWorker")


def assert_quiet(output: str, most_lines: int) -> None:
    lines = output.splitlines()
    assert len(lines) <= most_lines, output
    assert not [line for line in lines if NOISE.search(line)], output


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
    # DataComp's own figures: 1.1e21 MACs and 450 TB of shards for xlarge
    assert "compute: 1.1e+21 MACs" in out.stdout and "shards ~450.0 TB" in out.stdout
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
        (["run", "demo", "--set", "stages=[demo_pool, embedding]", "--dry-run"], "unknown stage 'embedding'"),
        (
            ["run", "demo", "--set", "stages=[demo_pool, train]", "--dry-run"],
            "'train' needs 'download' or 'subset' before it",
        ),
        (["run", "demo", "--set", "output_dir=/proc/forbidden"], "cannot create run directory"),
        (["run", "laion_a"], "embed.model is needed"),
        (["run", "demo", "--resume", "--set", "output_dir=/tmp/definitely-empty-xyz"], "cannot resume"),
        (["status", "no-such-run"], "no run at 'no-such-run'"),
        (["resume", "/tmp/definitely-empty-xyz"], "no run at"),
    ],
)
def test_bad_input_gives_a_one_line_error_and_nonzero_exit(args, message):
    out = cli(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_dry_run_with_missing_inputs_prints_the_plan_and_what_would_provide_them():
    out = cli("run", "laion_a", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert all(stage in out.stdout for stage in ("download", "dedupe", "embed", "filter", "subset"))
    for expected in (
        "missing: source.path: not found: data/laion_a/urls.parquet (--set source.path=...)",
        "(--set embed.model=...)",
        "needs head=<path> or the heads stage before filter (--set filter.strategy.1.head=...)",
        "a run needs the 3 input(s) above",
    ):
        assert expected in out.stdout, out.stdout


def test_unknown_option_is_rejected():
    out = cli("run", "demo", "--bogus")
    assert out.returncode == 2
    assert "No such option" in out.stderr


def status_states(status_output: str) -> dict[str, str]:
    """stage -> state, from `pipeline status`'s table."""
    rows = [line.split("│") for line in status_output.splitlines() if line.startswith("│")]
    return {row[1].strip(): row[2].strip() for row in rows if row[1].strip()}


NESTED_QUIET = """
import sys
from pathlib import Path
from rich.console import Console
from pipeline.terminal import output_to_log
out, err, root = Console(), Console(stderr=True), Path(sys.argv[1])
with output_to_log(root / "sweep", [out, err]):
    print("ray noise in the sweep")
    with output_to_log(root / "run", [out, err]):
        print("ray noise in the run", flush=True)
        out.print("stage line")
        err.print("progress bar")
    out.print("table")
print("after")
"""


def test_a_quiet_run_inside_a_quiet_sweep_keeps_the_consoles_on_the_terminal(tmp_path):
    """A sweep keeps Ray's lines in its own log and each run in its own, while the consoles of both
    still reach the terminal (an inner redirect must not send them to the outer log)."""
    done = subprocess.run(
        [sys.executable, "-c", NESTED_QUIET, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["stage line", "table", "after"] and done.stderr.splitlines() == ["progress bar"]
    assert (tmp_path / "sweep" / "driver.log").read_text() == "ray noise in the sweep\n"
    assert (tmp_path / "run" / "driver.log").read_text() == "ray noise in the run\n"
