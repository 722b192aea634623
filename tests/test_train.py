"""CLIP training on Ray Train: resume reproduces an uninterrupted run; models load safely; evaluation."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from stages import clip_models
from stages.evaluate import EvaluateConfig, run_evaluate
from stages.train import STATE_FILE, STEP_FILE, TrainConfig, latest_checkpoint, run_train
from tests.processes import kill_when, run_in_thread

CONFIG = TrainConfig(
    model="demo-tiny",
    samples_seen=32 * 6,
    batch_size=32,
    lr=1e-3,
    warmup=2,
    workers=2,
    checkpoint_every_samples=32 * 2,
    log_every_steps=1,
    shuffle_buffer=50,
)


@pytest.fixture(scope="module")
def shards(pool_shards):
    shards_dir, download = pool_shards
    return sorted(str(p) for p in shards_dir.glob("*.tar")), download.kept


def _losses(stage_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (stage_dir / "train_log.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_resumed_run_follows_the_uninterrupted_trajectory_past_a_torn_newest_checkpoint(ray_cluster, shards, tmp_path):
    """A worker killed mid-run: Ray Train restarts from the last checkpoint. Resume after a kill that tore
    the newest checkpoint: it loads the older complete one, says so in one line, logs each step once.
    Both follow the uninterrupted run step for step."""
    tars, n = shards
    # the uninterrupted run: the same batches as 2 micro-batches per worker under DDP's static graph,
    # so one run pins both accumulation and resume (each must follow it to float rounding)
    full = run_train(tars, n, CONFIG.model_copy(update={"accum_freq": 2, "ddp_static_graph": True}), tmp_path / "full")
    assert full.metrics["steps"] == 6 and full.metrics["resumed_from_step"] == 0
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"  # the local cluster's poll, handed to Ray Train
    # a plain run stopped after its second checkpoint (as a killed run would be); one of its workers is
    # SIGKILLed once it trains past the first checkpoint: Ray Train restarts the group from that checkpoint ...
    stage = tmp_path / "resumed"
    thread, outcome = run_in_thread(
        run_train, tars, n, CONFIG.model_copy(update={"stop_at_step": 4, "max_failures": 1}), stage
    )
    log = stage / "train_log.jsonl"
    killed = kill_when(lambda: log.exists() and '"step": 3,' in log.read_text(), "RayTrainWorker")
    thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].metrics["steps"] == 4 and not Path(f"/proc/{killed}").exists()
    # ... and follows the uninterrupted run past the restart (steps after the checkpoint may be logged twice)
    restarted = [json.loads(line) for line in (stage / "train_log.jsonl").read_text().splitlines()]
    assert {r["step"] for r in restarted} == {1, 2, 3, 4}
    for row in restarted:
        assert row["loss"] == pytest.approx(_losses(tmp_path / "full")[row["step"]], abs=1e-4), row
    folders = [f for f in stage.glob("ray/attempt-*/checkpoint_*") if f.is_dir()]
    step_of = {f: json.loads((f / STEP_FILE).read_text())["step"] for f in folders}
    checkpoints = sorted(step_of, key=step_of.get)
    assert [step_of[f] for f in checkpoints] == [2, 4]
    at_step_2 = torch.load(checkpoints[0] / STATE_FILE, weights_only=True)["model"]
    # ... while writing the newest one: half its state on disk, the older one intact
    state = checkpoints[-1] / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    lines: list[str] = []
    resumed = run_train(tars, n, CONFIG, stage, log=lines.append)
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.outputs["resumed_from"] == str(checkpoints[0])
    assert resumed.metrics["steps"] == 6
    assert len(lines) == 1 and "incomplete" in lines[0] and "resuming from step 2" in lines[0]
    assert [p.name for p in (stage / "ray").iterdir() if p.is_dir()] == ["attempt-001"]  # torn attempts are gone
    steps = [json.loads(line)["step"] for line in (stage / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the steps after the loaded checkpoint are logged once, not twice
    expected, got = _losses(tmp_path / "full"), _losses(stage)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    # the equality is not vacuous: the optimiser moved the weights from step 2 to step 6
    # (whether 6 steps lower the loss is batch noise; learning itself is pinned by the demo chain's floors)
    last = torch.load(Path(full.outputs["checkpoint"]) / STATE_FILE, weights_only=True)["model"]
    assert max((last[k].float() - at_step_2[k].float()).abs().max().item() for k in last) > 1e-3
    model, _, _ = clip_models.load(Path(full.outputs["model"]))
    assert isinstance(model, torch.nn.Module)
    assert latest_checkpoint(tmp_path / "full" / "ray").name.startswith("checkpoint_")


def test_evaluation_reports_zero_shot_and_retrieval(tiny_model, served_pool, tmp_path):
    pool_dir, _ = served_pool  # the model need not be trained: the figures are checked for range and shape
    manifest = run_evaluate(Path(tiny_model), pool_dir / "eval", EvaluateConfig(), tmp_path / "eval")
    manifest.check_balance()
    assert manifest.kept == 40
    for key in ["zeroshot_top1", "zeroshot_top5", "image_to_text_recall_at_1", "text_to_image_recall_at_10"]:
        assert 0.0 <= manifest.metrics[key] <= 1.0
    assert manifest.metrics["zeroshot_chance"] == pytest.approx(1 / 120)
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == manifest.metrics
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        run_evaluate(Path(tiny_model), tmp_path, EvaluateConfig(), tmp_path / "eval2")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_a_malicious_checkpoint_executes_nothing(tmp_path):
    exploit = _Exploit()
    exploit.marker = tmp_path / "pwned"
    (tmp_path / clip_models.WEIGHTS).write_bytes(pickle.dumps({"model": exploit}))
    (tmp_path / clip_models.MODEL_INFO).write_text(json.dumps({"model": "demo-tiny"}))
    with pytest.raises(pickle.UnpicklingError):
        clip_models.load(tmp_path)
    assert not exploit.marker.exists()


def test_missing_model_and_bad_config_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        clip_models.load(tmp_path)
    with pytest.raises(ValueError, match="smaller than train.workers"):
        TrainConfig(batch_size=2, workers=3)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        clip_models.create("no-such-model")


def test_clip_benchmark_layout_files_are_read(tmp_path):
    from stages.evaluate import read_classnames, read_templates

    (tmp_path / "classnames.txt").write_text("red circle\nblue square\n\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c}\n")
    assert read_classnames(tmp_path) == ["red circle", "blue square"]
    assert read_templates(tmp_path, ["unused {}"]) == ["a photo of a {}.", "{}"]
    assert read_templates(tmp_path / "none", ["a {}."]) == ["a {}."]


def test_siglip_from_a_local_checkpoint_with_the_image_tower_locked(ray_cluster, shards, tiny_model, tmp_path):
    """open_clip's --siglip, --pretrained (a local file: nothing is fetched) and --lock-image, together,
    on 2 DDP workers with 2 micro-batches each (DDP's reduction deferred to the last one)."""
    tars, n = shards
    config = CONFIG.model_copy(
        update={"samples_seen": 64, "accum_freq": 2, "siglip": True, "pretrained": tiny_model, "lock_image": True}
    )
    trained = run_train(tars, n, config, tmp_path / "lit")
    assert trained.metrics["steps"] == 2 and all(math.isfinite(v) for v in _losses(tmp_path / "lit").values())
    start = torch.load(Path(tiny_model) / clip_models.WEIGHTS, weights_only=True)
    end = torch.load(Path(trained.outputs["model"]) / clip_models.WEIGHTS, weights_only=True)
    assert "logit_bias" in end and "logit_bias" not in start  # SigLIP's learned bias
    image = [k for k in start if k.startswith("visual.")]
    text = [k for k in start if k.startswith("transformer.")]
    assert all(torch.equal(start[k], end[k]) for k in image)  # locked, and from the checkpoint
    assert not all(torch.equal(start[k], end[k]) for k in text)  # the text tower trained


def test_evaluation_tasks_in_clip_benchmark_layout_and_at_another_resolution(tiny_model, served_pool, tmp_path):
    import shutil

    pool_dir, _ = served_pool
    task = tmp_path / "tasks" / "shapes"  # CLIP_benchmark's layout: shards in test/, class names as text
    (task / "test").mkdir(parents=True)
    for tar in (pool_dir / "eval").glob("*.tar"):
        shutil.copy(tar, task / "test")
    classnames = json.loads((pool_dir / "eval" / "classnames.json").read_text())
    (task / "classnames.txt").write_text("\n".join(classnames) + "\n")
    config = EvaluateConfig(tasks=[str(task)])
    metrics = run_evaluate(Path(tiny_model), pool_dir / "eval", config, tmp_path / "eval").metrics
    for key in ("zeroshot_top1", "image_to_text_recall_at_5"):  # the same images, labels and captions
        assert metrics[f"task/shapes/{key}"] == pytest.approx(metrics[key])
        assert metrics[f"tasks_average/{key}"] == pytest.approx(metrics[key])
    larger = EvaluateConfig(image_size=96)
    at_96 = run_evaluate(Path(tiny_model), pool_dir / "eval", larger, tmp_path / "eval96").metrics
    model, transform, _ = clip_models.load(Path(tiny_model), image_size=96)
    assert model.visual.image_size == (96, 96) and transform.transforms[0].size == 96
    assert 0 <= at_96["zeroshot_top1"] <= 1 and at_96 != metrics


def test_a_trial_behind_the_others_at_a_checkpoint_stops_there_on_every_worker(
    ray_cluster, shards, served_pool, tmp_path, monkeypatch
):
    """The sweep's early stopping inside a real fit on 2 workers: another trial already scored 1.0 at
    step 2 on the board, so this one (an untrained model) is behind it there and both workers stop at
    step 2; the stage finishes with that checkpoint and says why; a rerun trains nothing more. The
    evaluation set is named relative to the working directory, as a run under `output_dir: runs`
    names it: the workers, which Ray Train starts in a folder of their own, still find it."""
    from stages.train.early_stop import EarlyStopConfig, decide

    pool_dir, _ = served_pool
    board = tmp_path / "board"
    leader = EarlyStopConfig(board=str(board), trial="leader", reduction_factor=2)
    assert decide(leader, 2, 1.0) is None  # first at rung 1 (steps 2-3 with rf 2): nothing to compare with
    stop = EarlyStopConfig(board=str(board), trial="behind", reduction_factor=2)
    monkeypatch.chdir(pool_dir)
    config = CONFIG.model_copy(update={"zeroshot_frequency": 1, "zeroshot_eval_dir": "eval", "early_stop": stop})
    lines: list[str] = []
    manifest = run_train(*shards, config, tmp_path / "train", log=lines.append)
    assert manifest.metrics["steps"] == 2 and manifest.metrics["stopped_early_at_step"] == 2
    assert manifest.metrics["samples_seen"] == 64 and manifest.kept == manifest.in_count
    assert (
        len(lines) == 1
        and "stopped early at step 2 of 6: zeroshot_top1" in lines[0]
        and "below the cutoff 1.000" in lines[0]
    )
    assert [json.loads(line)["step"] for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    assert json.loads((board / "rung_1" / "behind.json").read_text())["score"] < 1.0
    model, _, _ = clip_models.load(Path(manifest.outputs["model"]))
    assert isinstance(model, torch.nn.Module)
    attempts = sorted((tmp_path / "train" / "ray").iterdir())
    again = run_train(*shards, config, tmp_path / "train", log=lines.append)  # a resumed sweep's rerun
    assert again.metrics["steps"] == 2 and sorted((tmp_path / "train" / "ray").iterdir()) == attempts
