"""Crash consistency: files appear whole or not at all; resume never trusts a torn checkpoint; a random-kill soak."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.atomic import PARTIAL_SUFFIX, Partial, atomic_path, remove_partials, write_text
from pipeline.config import load_recipe
from pipeline.orchestrator import run_pipeline
from stages.train import STATE_FILE, STEP_FILE, choose_checkpoint
from tests.benchmark_modules import load_benchmark
from tests.test_cli import assert_quiet, cli, status_states


def test_an_interrupted_write_leaves_the_old_file_and_no_new_one(tmp_path):
    target = tmp_path / "manifest.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_partial_file_is_invisible_to_readers_and_swept_on_restart(tmp_path):
    shard = Partial(tmp_path / "00000.tar")
    shard.tmp.write_bytes(b"half a tar")  # a writer killed here leaves only this
    assert shard.tmp.name.endswith(PARTIAL_SUFFIX)
    assert list(tmp_path.glob("*.tar")) == [] and list(tmp_path.glob("*.parquet")) == []
    folder = Partial(tmp_path / "model", folder=True)
    (folder.tmp / "weights.pt").write_bytes(b"x")
    assert remove_partials(tmp_path) == 2
    assert list(tmp_path.iterdir()) == []
    done = Partial(tmp_path / "00001.tar")
    done.tmp.write_bytes(b"whole")
    assert done.commit().read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["00001.tar"]


def _checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint folder as the train stage writes it: state first, step file (with the state's size) last."""
    folder.mkdir(parents=True)
    torch.save({"model": {"w": torch.full((64, 64), float(step))}, "optimizer": {}, "step": step}, folder / STATE_FILE)
    info = {"step": step, "model": "demo-tiny", "state_bytes": (folder / STATE_FILE).stat().st_size}
    (folder / STEP_FILE).write_text(json.dumps(info))
    return folder


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_passes_over_torn_checkpoints_to_the_newest_complete_one(tmp_path):
    storage = tmp_path / "ray"
    oldest = _checkpoint(storage / "attempt-000" / "checkpoint_a", 3)
    torn = _checkpoint(storage / "attempt-000" / "checkpoint_b", 6)
    _cut_in_half(torn / STATE_FILE)
    copying = _checkpoint(storage / "attempt-001" / "checkpoint_c", 9)
    (copying / STATE_FILE).unlink()  # Ray had copied the step file but not yet the state
    choice = choose_checkpoint(storage)
    assert choice.folder == oldest and choice.step == 3
    assert [path for path, _ in choice.skipped] == [copying, torn]
    assert "state.pt is missing" in choice.skipped[0][1] and "bytes" in choice.skipped[1][1]
    lines = choice.fallback_lines()
    assert len(lines) == 2 and all("resuming from step 3" in line for line in lines)
    # a torn file of the right size (a damaged zip) is caught by loading it
    padded = _checkpoint(storage / "attempt-002" / "checkpoint_d", 12)
    data = (padded / STATE_FILE).read_bytes()
    (padded / STATE_FILE).write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    assert choose_checkpoint(storage).folder == oldest
    for folder in (oldest,):
        _cut_in_half(folder / STATE_FILE)
    nothing = choose_checkpoint(storage)
    assert nothing.folder is None and nothing.step == 0 and "the start" in nothing.fallback_lines()[0]


def test_random_kill_soak_every_resume_succeeds_and_the_result_equals_an_uninterrupted_run(ray_cluster, tmp_path):
    """Killed at the three writer events (a shard, a checkpoint, an MLflow upload caught mid-write) on
    the chain without models, then resumed; the download's resume skips the shards already finished.
    The checkpoint is caught by Ctrl-C, as a user presses it in a terminal: the console, `pipeline
    status` and the resume are what that user sees. Timed kills at random instants are
    `benchmarks/soak.py --kills 100`'s (all 11 stages)."""
    soak = load_benchmark("soak")
    lines: list[str] = []
    after_ctrl_c: dict[str, subprocess.CompletedProcess] = {}
    shards_at_kill: dict[str, list[str]] = {}

    def look_after_kill(attempt, run_dir: Path) -> None:
        if attempt.kill.signal == "INT":
            after_ctrl_c[str(run_dir)] = cli("status", run_dir.name, "--output-dir", str(run_dir.parent))
        if attempt.kill.event == "shard_write":  # a power cut mid-download: what the resume may skip
            download = run_dir / "download"
            finished = sorted(p.name for p in (download / "shards").glob("*_stats.json"))
            shards_at_kill[str(run_dir)] = finished + (
                ["manifest.json"] if (download / "manifest.json").exists() else []
            )

    # the uninterrupted reference: the same chain and overrides, run in this process on the suite's Ray
    # (a CLI process would add only its start-up); the soaked runs are CLI processes with Ray of their own
    port = soak.free_port()
    overrides = soak.soak_overrides(tmp_path / "reference", str(tmp_path / "unused"), port, soak.MODEL_FREE)
    run_pipeline(load_recipe("demo", overrides), run_name=soak.RUN, log=lambda m: None)
    reference = tmp_path / "reference" / soak.RUN
    soak.drop_bulk(reference)
    signals = {"shard_write": "KILL", "checkpoint_persist": "INT", "artifact_upload": "KILL"}
    report = soak.soak(
        kills=3, seed=1, workdir=tmp_path, reference=reference, log=lines.append, stages=soak.MODEL_FREE,
        signals=signals, after_kill=look_after_kill,
    )  # fmt: skip
    killed = [a for a in report.attempts if a.killed]
    assert report.failed_resumes == 0, "\n".join(lines)
    assert len(killed) >= 3, "\n".join(lines)
    assert len({a.where for a in killed}) >= 2, "\n".join(lines)  # not all in one stage
    assert {a.kill.event for a in killed} >= {"checkpoint_persist", "shard_write", "artifact_upload"}
    assert report.mismatches == [] and report.unreadable == [] and report.running_mlflow_runs == 0, report.summary()
    assert report.passed, "\n".join(lines)

    # SIGKILL while a shard was being written, one or more finished: the resume fetched only the others
    run_dir = tmp_path / "soaked-0" / soak.RUN
    finished = shards_at_kill[str(run_dir)]
    assert 1 <= len(finished) < 4 and "manifest.json" not in finished, finished
    download = json.loads((run_dir / "download" / "manifest.json").read_text())["metrics"]
    assert download["parts_skipped"] >= len(finished)

    # Ctrl-C while a checkpoint was being persisted: exit 130, a quiet console that says how to go on
    ctrl_c = next(a for a in killed if a.kill.signal == "INT")
    console = "\n".join(ctrl_c.console)
    assert ctrl_c.returncode == 130, console
    assert_quiet(console, 40)
    assert "error: interrupted: continue with `python -m pipeline resume RUN`" in console
    assert f"logs: {run_dir / 'logs'}" in console
    assert (run_dir / "logs" / "driver.log").is_file() and (run_dir / "logs" / "ray").is_dir()  # the rest
    status = after_ctrl_c[str(run_dir)]
    assert status.returncode == 0, status.stderr
    rows = status_states(status.stdout)
    assert rows["download"] == "finished" and rows["train"] == "interrupted" and rows["evaluate"] == "pending"
    assert f"python -m pipeline resume {run_dir}" in status.stdout
    # the resume that finished: earlier stages skipped, training's live line, the summary
    final = report.attempts[-1]
    console = "\n".join(final.console)
    assert final.returncode == 0 and final.kill is None, console
    assert_quiet(console, 40)
    assert "[demo_pool] finished earlier, skipped: in=160 kept=160" in console
    assert "[download] finished earlier, skipped" in console and "done:" in console
    assert re.search(r"train .* 8/8 loss \d+\.\d{3}, \d+ samples/s", console), console
    train = json.loads((run_dir / "train" / "manifest.json").read_text())["metrics"]
    assert train["steps"] == 8 and 0 <= train["resumed_from_step"] < 8  # which one depends on the kill's instant


def test_runs_a_killed_process_left_running_are_closed_on_resume(tmp_path):
    from pipeline.tracking import Tracker

    recipe = load_recipe("demo", [f"output_dir={tmp_path / 'runs'}"])
    run_dir = tmp_path / "runs" / "r"
    killed = Tracker(recipe, {})
    parent = killed.parent_run("r", {}, None, run_dir=run_dir)
    orphan_parent = parent.__enter__()  # the process dies here: no __exit__, nothing recorded in run.json
    with killed.stage_run(orphan_parent, "download", {}) as stage:
        pass
    orphan_stage = killed.call("create_run", killed.experiment_id, tags={"run_dir": killed.run_dir}).info.run_id
    resumed = Tracker(recipe, {})
    with resumed.parent_run("r", {}, None, run_dir=run_dir) as new_parent:
        status = {r: resumed.call("get_run", r).info.status for r in (orphan_parent, orphan_stage, stage, new_parent)}
    assert status == {orphan_parent: "KILLED", orphan_stage: "KILLED", stage: "FINISHED", new_parent: "RUNNING"}
    parent.__exit__(None, None, None)


def test_ctrl_c_swallowed_by_a_finalizer_is_still_remembered():
    """Python ignores a KeyboardInterrupt raised inside `__del__` (Ray Data's iterators have them);
    the run must still stop at the next check instead of going on to finish."""
    import gc
    import os
    import signal
    import time

    from pipeline.interrupts import ctrl_c_remembered, raise_if_interrupted

    class PressesCtrlCWhileFinalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs here, inside the finalizer, and its exception is dropped

    with ctrl_c_remembered():
        raise_if_interrupted()  # nothing pressed yet
        PressesCtrlCWhileFinalized()  # finalized at once: the KeyboardInterrupt goes nowhere
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    raise_if_interrupted()  # the record ends with the run
