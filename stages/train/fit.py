"""One training run of the stage: resume from the newest complete checkpoint, fit with Ray Train's
TorchTrainer (Ctrl-C kept as Ctrl-C), verify the final checkpoint, export the model, account."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.interrupts import note_interrupt
from pipeline.manifest import Manifest
from stages.mlflow_sink import MlflowSink
from stages.selection import KeptMask
from stages.train.checkpoints import (
    checkpoint_artifact,
    checkpoint_problem,
    choose_checkpoint,
    export_model,
    new_attempt_name,
    recorded_step,
    remove_other_checkpoints,
    trim_log,
)
from stages.train.config import LOG_FILE, ZEROSHOT_FILE, Tracking, TrainConfig, TrainOutputs
from stages.train.early_stop import last_step, stopped_early
from stages.train.loop import train_loop_per_worker


def run_train(
    shards: list[str],
    n_samples: int,
    config: TrainConfig,
    stage_dir: Path,
    tracking: Tracking | None = None,
    log: Callable[[str], None] = print,
    mask: KeptMask | None = None,
) -> Manifest:
    """Train on `shards` (which hold `n_samples` samples), or on the samples `mask` keeps of them;
    write the final model to stage_dir/model.

    A rerun resumes from the newest *complete* checkpoint of earlier attempts (see
    `choose_checkpoint`) and says so when a newer one had to be passed over.
    """
    if mask is not None:
        if mask.in_count != n_samples:
            raise RuntimeError(f"train: the shards' tables list {mask.in_count} samples, their stage kept {n_samples}")
        if not mask.kept:
            raise ValueError("train: the latest decisions keep none of the samples in its shards")
        shards = mask.shards
    if not shards:
        raise ValueError("train: no shards to train on")
    started = time.perf_counter()
    stage_dir = stage_dir.absolute()
    storage = stage_dir / "ray"
    resume = choose_checkpoint(storage)
    for line in resume.fallback_lines():
        log(line)
    stage_dir.mkdir(parents=True, exist_ok=True)
    for name in (LOG_FILE, ZEROSHOT_FILE):
        trim_log(stage_dir / name, resume.step)
    # an earlier attempt may have been stopped by the sweep's early stopping
    stop = last_step(stage_dir, min(config.total_steps, config.stop_at_step or config.total_steps))
    if resume.folder is not None and resume.step >= stop:
        final = resume.folder  # killed after the last checkpoint but before the manifest: nothing left to train
    else:
        final = _fit(shards, config, stage_dir, storage, resume.folder, tracking, stop, mask)
        stop = last_step(stage_dir, stop)  # or this fit's own stop
    early = stopped_early(stage_dir)
    if early:
        log(f"train: stopped early at step {early['step']} of {config.total_steps}: {early['reason']}")
    step = recorded_step(final)
    if step != stop:
        raise RuntimeError(f"train: the last complete checkpoint is step {step}, expected {stop} ({final})")
    model_dir = export_model(final, config.model, stage_dir / "model")
    remove_other_checkpoints(storage, keep=final, finished=stop == config.total_steps or early is not None)
    if tracking is not None:
        sink = MlflowSink(tracking.uri)
        sink.call("set_tag", tracking.run_id, "resumed_from", str(resume.folder or ""))
        sink.call("log_artifacts", tracking.run_id, str(model_dir), "model")
        sink.call("log_artifacts", tracking.run_id, str(final), checkpoint_artifact(step))
    seconds = time.perf_counter() - started
    return Manifest(
        stage="train",
        **{"in": n_samples},
        kept=mask.kept if mask else n_samples,
        dropped=mask.dropped if mask else {},
        outputs=TrainOutputs(
            model=str(model_dir),
            checkpoint=str(final),
            log=str(stage_dir / LOG_FILE),
            resumed_from=str(resume.folder or ""),
        ).as_dict(),
        seconds=seconds,
        metrics={
            "steps": float(step),
            "samples_seen": float(step * config.step_batch),
            "resumed_from_step": float(resume.step),  # the step whose weights were actually loaded
            "stopped_early_at_step": float(early["step"] if early else 0),
            "fit_samples_per_second": step * config.step_batch / seconds,
        },
    )


def _fit(
    shards: list[str],
    config: TrainConfig,
    stage_dir: Path,
    storage: Path,
    resume: Path | None,
    tracking,
    stop: int,
    mask: KeptMask | None = None,
) -> Path:
    """One Ray Train run from `resume` (or from scratch); the folder of its final checkpoint.

    Ray Train handles Ctrl-C itself (it aborts the run gracefully and `fit()` returns as if done),
    and leaves its handler installed, so every later stage would ignore Ctrl-C. We restore ours, and
    turn a run that stopped short of `stop` back into the KeyboardInterrupt it was.
    """
    import ray.train

    # Ray Train's controller polls its workers every 2 s by default and notices the start and the end
    # of a run only at a poll; 1 s takes ~3 s off every fit and is still one call per worker a second.
    # The driver's value is what Ray Train hands its controller: a Ray the run started on its own machine
    # has its value in this process's environment already (pipeline.runtime), a Ray Job's driver in
    # the job's runtime env. A value the user set wins.
    from pipeline.runtime import HEALTH_CHECK

    job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    os.environ.setdefault(HEALTH_CHECK, job_env.get(HEALTH_CHECK, "1"))
    _InterruptAwareTrainer = _interrupt_aware_trainer()  # noqa: N806 (a class)
    loop_config = {
        "train": _absolute_paths(config).model_dump(),
        "shards": [str(Path(s).absolute()) for s in shards],
        "mask": {"folder": str(Path(mask.folder).absolute())} if mask else None,
        "resume_path": str(resume) if resume else None,
        "tracking": vars(tracking) if tracking else None,
        "log_path": str(stage_dir / LOG_FILE),
    }
    trainer = _InterruptAwareTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.threads_per_worker}
        ),
        run_config=ray.train.RunConfig(
            # A fresh name per attempt: Ray Train would otherwise restore its own snapshot of an earlier
            # attempt (possibly torn by the kill) instead of the checkpoint verified above.
            name=new_attempt_name(storage),
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
    )
    ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()  # raises ray.train.TrainingFailedError once max_failures are spent
    except SystemExit as exit_:  # Ray's core turns a Ctrl-C inside `ray.get` into SystemExit(1)
        if trainer.interrupted:
            raise KeyboardInterrupt("train: interrupted") from exit_
        raise
    finally:
        if threading.current_thread() is threading.main_thread():  # Ray registers it only there too
            signal.signal(signal.SIGINT, ctrl_c)
    if result.checkpoint is not None and checkpoint_problem(Path(result.checkpoint.path)) is None:
        final = Path(result.checkpoint.path)
    else:
        final = choose_checkpoint(storage).folder
    reached = recorded_step(final) if final is not None else 0
    if reached < last_step(stage_dir, stop) or trainer.interrupted:  # Ctrl-C near the end still stops the run
        raise KeyboardInterrupt(f"train: interrupted at step {reached} of {stop}")
    return final


def _absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config's local paths made absolute here: Ray Train starts its workers in a folder of its
    own, where a path relative to the run's working directory (`output_dir: runs`) names nothing."""
    paths = {key: getattr(config, key) for key in ("pretrained", "zeroshot_eval_dir")}
    update = {key: str(Path(value).absolute()) for key, value in paths.items() if value and Path(value).exists()}
    return config.model_copy(update=update)


def _interrupt_aware_trainer():
    from ray.train.torch import TorchTrainer

    class InterruptAwareTrainer(TorchTrainer):
        """A TorchTrainer that remembers a Ctrl-C its own handler swallowed.

        Ray Train's handler aborts the run gracefully and `fit()` returns normally; when the Ctrl-C
        comes after the last step (while the final checkpoint is reported), nothing shows it."""

        interrupted = False

        def _register_sigint_handler(self, controller) -> None:
            super()._register_sigint_handler(controller)
            ray_handler = signal.getsignal(signal.SIGINT)

            def remember(signum, frame):
                self.interrupted = True
                note_interrupt()
                ray_handler(signum, frame)

            signal.signal(signal.SIGINT, remember)

    return InterruptAwareTrainer
