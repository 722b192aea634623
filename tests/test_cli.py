"""The command line as a user runs it: `python -m pipeline ...` in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from stages.train import latest_checkpoint
from tests.conftest import small_demo_overrides


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


@pytest.mark.slow
def test_ctrl_c_during_training_then_resume_continues_from_the_checkpoint(tmp_path):
    import json
    import signal
    import time

    import mlflow

    runs = tmp_path / "runs"
    overrides = [o for o in small_demo_overrides(runs) if not o.startswith("stages=")] + [
        "stages=[demo_pool, download, phash, dedupe, subset, train, evaluate]",  # the model-free chain: quicker
        f"ray.temp_dir=/tmp/rtk{os.getpid()}",
        "train.samples_seen=384",
        "train.batch_size=32",
        "train.accum_freq=2",  # two micro-batches of 16 a step: open_clip's accumulation in the real loop
        "train.checkpoint_every_samples=96",
        "train.log_every_steps=1",
        "subset.samples_per_shard=60",
    ]
    console = tmp_path / "console.txt"
    first = start_in_background(
        "run", "demo", "--run-name", "k", *[x for o in overrides for x in ("--set", o)], output=console
    )
    storage = runs / "k" / "train" / "ray"
    deadline = time.time() + 240
    while time.time() < deadline and not (runs / "k" / "train" / "progress.json").exists():
        assert first.poll() is None, "the run ended before training started"
        time.sleep(0.2)
    live = cli("status", "k", "--output-dir", str(runs))  # another process, while the run trains
    assert _states(live.stdout)["train"] == "running" and _states(live.stdout)["download"] == "finished"
    assert re.search(r"step \d+/12, loss \d+\.\d{3}", live.stdout), live.stdout
    assert "resume" not in live.stdout  # nothing to continue while it runs
    # wait for a *complete* checkpoint (what resume may use), not for the first file of one being copied
    while time.time() < deadline and latest_checkpoint(storage) is None:
        assert first.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.5)
    assert latest_checkpoint(storage) is not None, "no checkpoint within 4 minutes"
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    first.wait(timeout=120)
    assert not (runs / "k" / "train" / "manifest.json").exists()
    assert first.returncode == 130, console.read_text()
    assert_quiet(console.read_text(), 40)
    assert "error: interrupted: continue with `python -m pipeline resume RUN`" in console.read_text()
    assert f"logs: {runs / 'k' / 'logs'}" in console.read_text()
    assert (runs / "k" / "logs" / "driver.log").is_file() and (runs / "k" / "logs" / "ray").is_dir()  # the rest

    status = cli("status", "k", "--output-dir", str(runs))
    assert status.returncode == 0, status.stderr
    rows = _states(status.stdout)
    assert rows["download"] == "finished" and rows["train"] == "interrupted" and rows["evaluate"] == "pending"
    assert f"python -m pipeline resume {runs / 'k'}" in status.stdout

    out = cli("resume", str(runs / "k"), timeout=400)  # the recipe and its overrides come from run.json
    assert out.returncode == 0, out.stderr[-3000:]
    assert_quiet(out.stdout + out.stderr, 40)
    assert re.search(r"train .* 12/12 loss \d+\.\d{3}, \d+ samples/s", out.stderr), out.stderr  # its live line
    assert "[download] finished earlier, skipped" in out.stdout
    assert "[demo_pool] finished earlier, skipped: in=160 kept=160" in out.stdout and "done:" in out.stdout
    train = json.loads((runs / "k" / "train" / "manifest.json").read_text())
    assert train["metrics"]["resumed_from_step"] >= 3
    assert train["metrics"]["steps"] == 12
    assert (runs / "k" / "evaluate" / "results.json").exists()
    client = mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db")
    experiment = client.get_experiment_by_name("demo").experiment_id
    statuses = sorted(r.info.status for r in client.search_runs([experiment], "tags.stage = 'train'"))
    assert "RUNNING" not in statuses and statuses.count("FINISHED") == 1 and len(statuses) == 2
    finished = cli("status", str(runs / "k"))
    assert finished.stdout.count("finished") == 7 and "resume" not in finished.stdout


def _states(status_output: str) -> dict[str, str]:
    """stage -> state, from `pipeline status`'s table."""
    rows = [line.split("│") for line in status_output.splitlines() if line.startswith("│")]
    return {row[1].strip(): row[2].strip() for row in rows if row[1].strip()}


def _kill_ray_processes_of(temp_dir: str) -> None:
    """A SIGKILLed run leaves its local Ray cluster behind; its processes name the run's temp dir."""
    import signal
    from pathlib import Path

    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and temp_dir in (entry / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


@pytest.mark.slow
def test_sigkill_mid_download_then_resume_redoes_only_unfinished_shards(tmp_path):
    import json
    import signal
    import time

    runs = tmp_path / "runs"
    ray_dir = f"/tmp/rtx{os.getpid()}"
    overrides = [o for o in small_demo_overrides(runs) if not o.startswith("stages=")] + [
        "stages=[demo_pool, download, phash]",
        f"ray.temp_dir={ray_dir}",
        "source.demo.defects.slow=0.4",  # 40% of the urls answer after 0.25 s: the stage takes a while
        "source.demo.slow_seconds=0.25",
        "download.thread_count=2",
        "download.timeout=10",
    ]
    first = start_in_background("run", "demo", "--run-name", "x", *[a for o in overrides for a in ("--set", o)])
    shards = runs / "x" / "download" / "shards"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(shards.glob("*_stats.json")):
            assert first.poll() is None, "the run ended before its first shard"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # no cleanup, no Ctrl-C handler: power-cut semantics
        first.wait(timeout=60)
    finally:
        _kill_ray_processes_of(ray_dir)
    done_before = len(list(shards.glob("*_stats.json")))
    assert 1 <= done_before < 4 and not (runs / "x" / "download" / "manifest.json").exists()

    out = cli("resume", str(runs / "x"), timeout=400)
    _kill_ray_processes_of(ray_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    download = json.loads((runs / "x" / "download" / "manifest.json").read_text())
    assert download["metrics"]["parts_skipped"] >= done_before  # finished shards were not fetched again
    assert (
        download["in"] == 160 == download["kept"] + sum(download["dropped"].values()) + sum(download["failed"].values())
    )
    phash = json.loads((runs / "x" / "phash" / "manifest.json").read_text())
    assert phash["in"] == download["kept"]
