"""Train stage: CLIP training with Ray Train's TorchTrainer on open_clip models.

Each worker streams the shards (`stages.train_data`), trains with open_clip's ClipLoss (learnable
temperature, local loss, gathered features), AdamW with open_clip's no-weight-decay groups,
open_clip's cosine schedule with warmup, gradient clipping, and bf16 autocast on GPU. The budget
is samples seen, as DataComp fixes it per scale. Every `checkpoint_every_samples` the state
(model, optimiser, step) is reported to Ray Train as a checkpoint (the final one, and every
`mlflow_checkpoint_every`-th if set, is copied to MLflow); a rerun
resumes from the latest one and sees the same batches an uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline.atomic import PARTIAL_SUFFIX, is_partial, write_text
from pipeline.budget import training_budget
from pipeline.interrupts import note_interrupt
from pipeline.manifest import Manifest
from pipeline.models import StrictModel
from pipeline.progress import ProgressWriter
from pipeline.stage import (
    Decisions,
    MissingInput,
    PlanRow,
    Resources,
    RunContext,
    Shards,
    SourceOutputs,
    Stage,
    StageOutputs,
    earlier_source,
)
from stages.early_stop import EarlyStopConfig, last_step, record_stop, stopped_early, verdict
from stages.kept_mask import MASK_DIR, KeptMask, write_kept_mask
from stages.mlflow_sink import MlflowSink

STATE_FILE = "state.pt"
STEP_FILE = "train_state.json"
LOG_FILE = "train_log.jsonl"
ZEROSHOT_FILE = "zeroshot.jsonl"  # zero-shot during training (zeroshot_frequency)


def curve_key(name: str) -> str:
    """Per-step metrics in MLflow: `train/loss`, `train/lr`, ... (one section of charts in its UI)."""
    return f"train/{name}"


ATTEMPT_PREFIX = "attempt-"  # one Ray Train run name per attempt (first run, then each resume)


class AugCfg(StrictModel):
    """open_clip's `AugmentationCfg` (its `--aug-cfg`): the train transform. LAION's augreg models
    used scale (0.33, 1.0), re_prob 0.35 with use_timm."""

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] | None = None
    color_jitter: float | tuple[float, float, float] | tuple[float, float, float, float] | None = None
    re_prob: float | None = Field(None, ge=0, le=1, description="random erasing (needs use_timm)")
    re_count: int | None = Field(None, ge=1)
    use_timm: bool = False
    color_jitter_prob: float | None = Field(None, ge=0, le=1)
    gray_scale_prob: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _timm_only(self) -> AugCfg:
        if not self.use_timm and (self.re_prob or self.re_count):
            raise ValueError("re_prob/re_count are timm's random erasing: set use_timm: true (open_clip ignores them)")
        return self


class TrainConfig(StrictModel):
    """Compute budget and optimiser of CLIP training (DataComp fixes the first five per scale)."""

    model: str = "ViT-B-32"
    samples_seen: int = Field(12_800_000, gt=0)
    batch_size: int = Field(
        4096,
        gt=0,
        description="global batch per optimiser step; a remainder after dividing by workers x accum_freq is not used",
    )
    accum_freq: int = Field(1, ge=1, description="micro-batches per step, the loss over the whole batch (open_clip's)")
    aug_cfg: AugCfg = Field(default_factory=AugCfg)
    force_image_size: int | None = Field(None, gt=0, description="train at this image size instead of the model's")
    drop_path: float | None = Field(
        None, ge=0, lt=1, description="stochastic depth of a timm image tower (ConvNeXt); None: the model config's"
    )
    ddp_static_graph: bool = Field(False, description="DDP's static_graph (open_clip's --ddp-static-graph)")
    siglip: bool = Field(False, description="open_clip's SigLipLoss (sigmoid, learned bias) instead of ClipLoss")
    pretrained: str | None = Field(None, description="start from this local open_clip checkpoint file or model folder")
    lock_image: bool = Field(False, description="LiT: freeze the image tower")
    lock_image_unlocked_groups: int = Field(0, ge=0, description="its last N layer groups stay trainable")
    lock_text: bool = Field(False, description="freeze the text tower")
    lock_text_unlocked_layers: int = Field(0, ge=0, description="its last N layers stay trainable")
    zeroshot_frequency: int = Field(
        0, ge=0, description="zero-shot and retrieval every N checkpoint intervals (open_clip: N epochs); 0: off"
    )
    zeroshot_eval_dir: str | None = Field(None, description="the set scored during training; default: the source's")
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(500, ge=0, description="warmup steps")
    weight_decay: float = Field(0.2, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.98, gt=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    workers: int = Field(1, gt=0)
    use_gpu: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU")
    grad_checkpointing: bool = False
    local_loss: bool = True
    gather_with_grad: bool = True
    checkpoint_every_samples: int = Field(1_000_000, gt=0)
    mlflow_checkpoint_every: int = Field(
        0,
        ge=0,
        description="also copy every Nth checkpoint (model + optimiser state) to MLflow; 0: only the final one",
    )
    log_every_steps: int = Field(10, gt=0)
    loader_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(1000, gt=0)
    threads_per_worker: int = Field(1, gt=0, description="torch CPU threads in each worker")
    seed: int = 0
    stop_at_step: int | None = Field(None, gt=0, description="stop early at this checkpoint step (staged runs)")
    max_failures: int = Field(1, ge=0, description="worker failures Ray Train recovers from")
    early_stop: EarlyStopConfig | None = Field(
        None, description="set by a sweep with early_stopping: stop when the zero-shot curve falls behind"
    )

    @model_validator(mode="after")
    def _batch_fits(self) -> TrainConfig:
        if self.micro_batch < 1:
            raise ValueError(
                f"train.batch_size {self.batch_size} is smaller than train.workers x train.accum_freq "
                f"({self.workers} x {self.accum_freq})"
            )
        if self.samples_seen < self.step_batch:
            raise ValueError("train.samples_seen must be at least one batch")
        return self

    @property
    def micro_batch(self) -> int:
        """Samples per worker per forward pass."""
        return self.batch_size // (self.workers * self.accum_freq)

    @property
    def step_batch(self) -> int:
        """The global batch a step really takes: batch_size rounded down to workers x accum_freq."""
        return self.micro_batch * self.workers * self.accum_freq

    @property
    def total_steps(self) -> int:
        return self.samples_seen // self.step_batch

    @property
    def checkpoint_every_steps(self) -> int:
        return max(1, self.checkpoint_every_samples // self.step_batch)

    def batch_note(self) -> str:
        """How the global batch is split; what of it goes unused when it does not divide."""
        split = f"{self.workers} worker(s) x {self.accum_freq} micro-batch(es) of {self.micro_batch:,}"
        unused = self.batch_size - self.step_batch
        return split + (f"; {unused} of batch {self.batch_size:,} unused per step" if unused else "")

    def model_overrides(self) -> dict:
        """What open_clip's factory is given besides the model name."""
        return {"force_image_size": self.force_image_size, "drop_path": self.drop_path, "siglip": self.siglip}


@dataclass(frozen=True)
class Tracking:
    """Where rank 0 logs step metrics and checkpoints: an MLflow store and the stage's run."""

    uri: str
    run_id: str


@dataclass(frozen=True)
class CheckpointChoice:
    """The newest complete checkpoint under a storage path, and the newer ones that were not."""

    folder: Path | None
    step: int
    skipped: tuple[tuple[Path, str], ...] = ()

    def fallback_lines(self) -> list[str]:
        target = f"step {self.step} ({self.folder})" if self.folder else "the start (no complete checkpoint)"
        return [f"train: checkpoint {path} is incomplete ({why}); resuming from {target}" for path, why in self.skipped]


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from; None when it is complete and loads.

    A kill can land while a checkpoint is being written or copied into Ray's storage, leaving the
    step file beside a truncated state file: its recorded size must match, and the state must load
    (`weights_only=True`, memory-mapped so that checking costs no RAM) and name the same step.
    """
    import torch

    try:
        info = json.loads((folder / STEP_FILE).read_text())
        expected = info.get("state_bytes")
        size = (folder / STATE_FILE).stat().st_size
        if expected is not None and size != expected:
            return f"{STATE_FILE} has {size:,} of {expected:,} bytes"
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        if int(state["step"]) != int(info["step"]):
            return f"{STATE_FILE} holds step {state['step']}, {STEP_FILE} says {info['step']}"
    except FileNotFoundError as err:
        return f"{Path(err.filename).name if err.filename else 'a file'} is missing"
    except Exception as err:  # noqa: BLE001 - a torn JSON, zip or pickle: any of them means incomplete
        return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    return None


def _recorded_step(folder: Path) -> int:
    try:
        return int(json.loads((folder / STEP_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # torn: sorts last, and is reported as incomplete if reached


def choose_checkpoint(storage: Path) -> CheckpointChoice:
    """The newest checkpoint under `storage` that is complete; newer incomplete ones are listed, not used."""
    folders = {f.parent for f in Path(storage).rglob(STEP_FILE) if not any(is_partial(Path(p)) for p in f.parts)}
    skipped: list[tuple[Path, str]] = []
    for folder in sorted(folders, key=lambda f: (_recorded_step(f), str(f)), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return CheckpointChoice(folder, _recorded_step(folder), tuple(skipped))
        skipped.append((folder, problem))
    return CheckpointChoice(None, 0, tuple(skipped))


def latest_checkpoint(storage: Path) -> Path | None:
    """The newest complete checkpoint folder under a Ray Train storage path."""
    return choose_checkpoint(storage).folder


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, norms and the temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs in every Ray Train worker."""
    import contextlib
    import logging

    import ray.train
    import ray.train.collective
    import ray.train.torch
    import torch
    from open_clip.loss import ClipLoss, SigLipLoss
    from open_clip_train.scheduler import cosine_lr

    from stages import clip_models
    from stages.train_data import Mask, batches
    from stages.train_step import backward_step

    config = TrainConfig.model_validate(loop_config["train"])
    logging.getLogger().setLevel(logging.WARNING)  # open_clip's per-model INFO lines, once per worker
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.threads_per_worker)
    torch.manual_seed(config.seed)
    model, preprocess, preprocess_eval, tokenizer = clip_models.create(
        config.model, aug_cfg=config.aug_cfg.model_dump(), **config.model_overrides()
    )
    prepare_start(model, config)
    static = {"static_graph": True} if config.ddp_static_graph and world > 1 else None
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=static)
    core = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(
        parameter_groups(core, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
    )
    schedule = cosine_lr(optimizer, config.lr, config.warmup, config.total_steps)
    if config.siglip:
        loss_fn = SigLipLoss(rank=rank, world_size=world)
    else:
        loss_fn = ClipLoss(
            local_loss=config.local_loss,
            gather_with_grad=config.gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world,
        )
    bf16 = device.type == "cuda" and config.precision in ("auto", "bf16")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    step = 0
    checkpoint = ray.train.get_checkpoint()  # a restart after a worker failure
    resume_dir = Path(loop_config["resume_path"]) if loop_config.get("resume_path") else None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = _load_state(Path(folder), core, optimizer)
    elif resume_dir is not None:
        step = _load_state(resume_dir, core, optimizer)

    tracking = Tracking(**loop_config["tracking"]) if loop_config.get("tracking") and rank == 0 else None
    client = MlflowSink(tracking.uri) if tracking else None
    log_path = Path(loop_config["log_path"])
    scorer = (
        ZeroShotDuringTraining(config, preprocess_eval, tokenizer, log_path.parent, str(device)) if rank == 0 else None
    )
    progress = ProgressWriter(log_path.parent)  # what `pipeline status` shows while this trains
    stop = last_step(log_path.parent, min(config.total_steps, config.stop_at_step or config.total_steps))
    per_worker = config.micro_batch * config.accum_freq
    every = config.checkpoint_every_steps
    window_started, data_wait, window_steps = time.perf_counter(), 0.0, 0
    while step < stop:
        segment = step // every
        segment_end = min((segment + 1) * every, stop)
        loader = iter(
            batches(
                loop_config["shards"],
                preprocess,
                tokenizer,
                per_worker,
                seed=config.seed,
                rank=rank,
                segment=segment,
                loader_workers=config.loader_workers,
                shuffle_buffer=config.shuffle_buffer,
                mask=Mask(**loop_config["mask"]) if loop_config.get("mask") else None,
            )
        )
        metrics = {}
        while step < segment_end:
            waited = time.perf_counter()
            images, texts = next(loader)
            data_wait += time.perf_counter() - waited
            images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
            schedule(step)
            optimizer.zero_grad(set_to_none=True)
            loss = backward_step(model, loss_fn, images, texts, config.accum_freq, autocast)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            with torch.no_grad():
                core.logit_scale.clamp_(0, math.log(100))
            step += 1
            window_steps += 1
            if step % config.log_every_steps == 0 or step == segment_end:
                elapsed = time.perf_counter() - window_started
                metrics = {
                    "loss": float(loss.detach()),
                    "lr": optimizer.param_groups[0]["lr"],
                    "temperature": float(1 / core.logit_scale.detach().exp()),
                    "samples_per_second": window_steps * config.step_batch / elapsed,
                    "samples_per_second_per_worker": window_steps * per_worker / elapsed,
                    "data_wait_fraction": data_wait / elapsed,
                    "samples_seen": step * config.step_batch,
                }
                if rank == 0:
                    _log_step(log_path, client, tracking, step, metrics, progress, config.total_steps)
                window_started, data_wait, window_steps = time.perf_counter(), 0.0, 0
        scores = scorer.score(core, step, client, tracking) if scorer is not None and scorer.due(step) else {}
        _report(core, optimizer, config, step, metrics, rank, client, tracking)
        if config.early_stop is not None and zeroshot_due(config, step) and step < stop:
            decided = verdict(config.early_stop, step, scores) if rank == 0 else None
            decided = ray.train.collective.broadcast_from_rank_zero(decided)  # every worker acts on rank 0's
            if decided["error"]:
                raise RuntimeError(f"train: early stopping at step {step}: {decided['error']}")
            if decided["reason"]:
                if rank == 0:
                    record_stop(log_path.parent, step, decided["reason"])
                break


def zeroshot_due(config: TrainConfig, step: int) -> bool:
    """Whether training scores zero-shot at this step: every `zeroshot_frequency` checkpoints, and at the end."""
    if not config.zeroshot_frequency or not config.zeroshot_eval_dir:
        return False
    interval = -(-step // config.checkpoint_every_steps)
    return interval % config.zeroshot_frequency == 0 or step == config.total_steps


class ZeroShotDuringTraining:
    """Rank 0 scores the model on the evaluation set at checkpoint boundaries (every
    `zeroshot_frequency` intervals, and at the end): a curve `eval/<metric>` in MLflow, and
    `zeroshot.jsonl` beside the train log. The set is read a batch at a time on each scoring (as open_clip's
    zero-shot does): memory stays one batch for an ImageNet-sized set."""

    def __init__(self, config: TrainConfig, preprocess, tokenizer, stage_dir: Path, device: str):
        self.config, self.preprocess, self.tokenizer, self.device = config, preprocess, tokenizer, device
        self.path = stage_dir / ZEROSHOT_FILE

    def due(self, step: int) -> bool:
        return zeroshot_due(self.config, step)

    def score(self, model, step: int, client, tracking: Tracking | None) -> dict[str, float]:
        from stages.evaluate import EvaluateConfig, encode_eval_set, score_model

        config, folder = EvaluateConfig(), Path(self.config.zeroshot_eval_dir)
        model.eval()
        try:
            encoded = encode_eval_set(model, self.preprocess, folder, config.batch_size, self.device)
            metrics = score_model(model, self.tokenizer, encoded, config, self.device)
        finally:
            model.train()
        curves = {k: v for k, v in metrics.items() if "chance" not in k}
        _append_and_log(self.path, client, tracking, step, curves, lambda name: f"eval/{name}")
        return metrics


def prepare_start(model, config: TrainConfig) -> None:
    """Before the first step: a fine-tune's weights, locked towers (LiT), gradient checkpointing."""
    from stages import clip_models

    if config.pretrained:
        # a CLIP checkpoint into a SigLIP model: the bias starts at its initial value
        clip_models.load_weights(model, Path(config.pretrained), config.model, may_lack=("logit_bias",))
    if config.lock_image:
        model.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups)
    if config.lock_text:
        model.lock_text_tower(unlocked_layers=config.lock_text_unlocked_layers)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)


def _load_state(folder: Path, model, optimizer) -> int:
    import torch

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _log_step(
    log_path: Path, client, tracking: Tracking | None, step: int, metrics: dict, progress: ProgressWriter, total: int
) -> None:
    _append_and_log(log_path, client, tracking, step, metrics, curve_key)
    progress.update(
        force=step == total,
        unit="steps",
        done=step,
        total=total,
        samples=int(metrics["samples_seen"]),
        samples_per_second=metrics["samples_per_second"],
        loss=metrics["loss"],
    )


def _append_and_log(
    path: Path, client, tracking: Tracking | None, step: int, metrics: dict, key: Callable[[str], str]
) -> None:
    """One step's metrics: a line of `path` (jsonl, trimmed on resume) and, when tracked, MLflow curves."""
    wall = time.time()  # when the step ended: wall-clock rates over any steps, and MLflow's timestamps
    with path.open("a") as log:
        log.write(json.dumps({"step": step, "time": round(wall, 3), **metrics}) + "\n")
    if client is not None:
        from mlflow.entities import Metric

        now = int(wall * 1000)
        curves = [Metric(key(k), float(v), now, step) for k, v in metrics.items()]
        client.call("log_batch", tracking.run_id, metrics=curves)


def checkpoint_artifact(step: int) -> str:
    return f"checkpoints/step_{step:08d}"


def _copied_to_mlflow(config: TrainConfig, step: int) -> bool:
    """Whether a checkpoint is copied to MLflow while training; the final one always is (by `run_train`).

    Each copy is the whole training state (about 3x the model), so at scale a copy per checkpoint
    costs as much as the checkpoints themselves; hence every Nth, or none before the final one."""
    n = config.mlflow_checkpoint_every
    index = -(-step // config.checkpoint_every_steps)  # 1-based; the last segment may be short
    return n > 0 and index % n == 0


def _report(model, optimizer, config: TrainConfig, step: int, metrics: dict, rank: int, client, tracking) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (and copies it to MLflow)."""
    import ray.train
    import torch

    if rank != 0:
        ray.train.report({**metrics, "step": step})
        return
    with tempfile.TemporaryDirectory() as folder:
        state_path = Path(folder) / STATE_FILE
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, state_path)
        # written last, with the state's size: a copy torn anywhere is recognised as incomplete
        info = {"step": step, "model": config.model, "state_bytes": state_path.stat().st_size}
        (Path(folder) / STEP_FILE).write_text(json.dumps(info))
        if client is not None and _copied_to_mlflow(config, step):
            client.call("log_artifacts", tracking.run_id, folder, checkpoint_artifact(step))
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder))


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
        _trim_log(stage_dir / name, resume.step)
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
    step = _recorded_step(final)
    if step != stop:
        raise RuntimeError(f"train: the last complete checkpoint is step {step}, expected {stop} ({final})")
    model_dir = _export_model(final, config.model, stage_dir / "model")
    _remove_other_checkpoints(storage, keep=final, finished=stop == config.total_steps or early is not None)
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
        "train": config.model_dump(),
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
            name=_new_attempt_name(storage),
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
    reached = _recorded_step(final) if final is not None else 0
    if reached < last_step(stage_dir, stop) or trainer.interrupted:  # Ctrl-C near the end still stops the run
        raise KeyboardInterrupt(f"train: interrupted at step {reached} of {stop}")
    return final


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


def _new_attempt_name(storage: Path) -> str:
    taken = {p.name for p in storage.glob(f"{ATTEMPT_PREFIX}*")} if storage.exists() else set()
    index = 0
    while f"{ATTEMPT_PREFIX}{index:03d}" in taken:
        index += 1
    return f"{ATTEMPT_PREFIX}{index:03d}"


def _remove_other_checkpoints(storage: Path, keep: Path, finished: bool) -> None:
    """Earlier attempts (and their torn checkpoints) once a later one has finished: renamed away,
    then deleted. Once training is `finished` (the final checkpoint verified whole, nothing left to
    resume), the older checkpoint Ray keeps as a fallback goes too: it is only disk."""
    try:
        kept_attempt = keep.relative_to(storage).parts[0]
    except (ValueError, IndexError):
        return
    for folder in storage.iterdir() if storage.exists() else []:
        if folder.is_dir() and folder.name != kept_attempt:
            _remove(folder)
    for folder in keep.parent.iterdir() if finished else []:
        if folder.is_dir() and folder != keep and folder.name.startswith("checkpoint_"):
            _remove(folder)


def _remove(folder: Path) -> None:
    if is_partial(folder):
        return
    doomed = folder.with_name(f".{folder.name}.removed{PARTIAL_SUFFIX}")
    folder.rename(doomed)  # one atomic step: a kill mid-delete leaves only a `.partial` to sweep
    shutil.rmtree(doomed, ignore_errors=True)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines after the resumed step (and a torn last line), so each step is logged once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(f"{line}\n" for line in kept))


def _export_model(checkpoint: Path, model_name: str, folder: Path) -> Path:
    """The final weights alone (no optimiser state), in the layout `clip_models.load` reads."""
    import torch

    from stages import clip_models

    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    return clip_models.save_state(state["model"], model_name, folder)


__all__ = ["TrainConfig", "Tracking", "choose_checkpoint", "latest_checkpoint", "run_train"]


class TrainOutputs(StageOutputs):
    model: str  # the exported model folder (open_clip config + weights), what evaluate and embed load
    checkpoint: str
    log: str  # train_log.jsonl: one line of metrics per step, replayed by `pipeline sync`
    resumed_from: str = ""


@dataclass
class TrainInputs:
    shards: Shards  # the latest shards made before training: the subset's, else the download's
    source: SourceOutputs | None = None  # its held-out set, scored during training (zeroshot_frequency)
    # the latest keep/drop verdicts; applied as a kept-uid mask unless the shards already applied them
    decisions: Decisions | None = None


class Train(Stage):
    name = "train"
    summary = "CLIP training with Ray Train (TorchTrainer), checkpoints in MLflow"
    config_model = TrainConfig
    Inputs = TrainInputs
    Outputs = TrainOutputs
    counts_from = "shards"

    def check(self, before: list[Stage]) -> None:
        c, source = self.config, earlier_source(before)
        if c.zeroshot_frequency and not c.zeroshot_eval_dir and not (source and source.gives_eval_set):
            message = "train.zeroshot_eval_dir is needed for zeroshot_frequency: the source has no held-out set"
            raise MissingInput(message, "train.zeroshot_eval_dir")
        if self.config.pretrained and not Path(self.config.pretrained).exists():
            raise MissingInput(f"train.pretrained: not found: {self.config.pretrained}", "train.pretrained")
        if self.config.drop_path is not None:
            from stages import clip_models

            clip_models.check_drop_path(self.config.model)

    def resources(self) -> Resources:
        c = self.config
        return Resources(cpus=c.threads_per_worker, gpus=1 if c.use_gpu else 0, actors=c.workers)

    def budget_lines(self) -> list[str]:
        c = self.config
        gpu = " on GPU" if c.use_gpu else ""
        lines = [
            f"training budget: model {c.model}, {c.samples_seen:,} samples seen, batch {c.batch_size:,} "
            f"({c.total_steps:,} steps), lr {c.lr:g}, warmup {c.warmup:,}, wd {c.weight_decay:g}, "
            f"beta2 {c.beta2:g}, grad-clip {c.grad_clip or 'off'}, {c.batch_note()}{gpu}, precision {c.precision}"
            + (", gradient checkpointing" if c.grad_checkpointing else ""),
            f"train transform: RandomResizedCrop scale {tuple(c.aug_cfg.scale)}"
            + (f", random erasing {c.aug_cfg.re_prob:g}" if c.aug_cfg.re_prob else "")
            + (f", stochastic depth {c.drop_path:g}" if c.drop_path is not None else "")
            + (f", image size {c.force_image_size}" if c.force_image_size else ""),
        ]
        intervals = c.samples_seen / c.checkpoint_every_samples
        lines.append(
            f"checkpoints: {c.samples_seen:,} samples seen in {intervals:,.4g} intervals of "
            f"{c.checkpoint_every_samples:,} ({c.checkpoint_every_steps:,} steps each)"
        )
        budget = training_budget(c.model, c.samples_seen, c.force_image_size)
        return [
            *lines,
            f"compute: {budget.macs:.2g} MACs (forward, both towers, x samples seen; DataComp's measure), "
            f"~{budget.train_flops:.2g} training FLOPs, ~{budget.reference_gpu_hours:,.1f} A100-hours at 40% MFU",
        ]

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        c = self.config
        device = "GPU" if c.use_gpu else "CPU"
        note = (
            f"{c.model}, {c.samples_seen:,} samples seen = {c.total_steps:,} steps of {c.step_batch:,}, "
            f"{c.workers} {device} worker(s), checkpoint every {c.checkpoint_every_steps:,} steps"
        )
        output = str(run_dir / self.name / "model")
        return PlanRow(
            self.name,
            "the latest shards (subset, else download through the latest decisions' kept-uid mask)",
            output,
            rows,
            note,
            self.resources().describe(),
        )

    def run(self, ctx: RunContext, inputs: TrainInputs) -> tuple[TrainOutputs, Manifest]:
        shards = sorted(str(p) for p in Path(inputs.shards.shards_dir).glob("*.tar"))
        tracking = Tracking(ctx.tracking_uri, ctx.stage_run_id) if ctx.tracking_uri and ctx.stage_run_id else None
        if ctx.upstream_kept is None:
            raise RuntimeError("train: the number of samples in its shards was not given (ctx.upstream_kept)")
        n_samples = ctx.upstream_kept  # what the stage that made the shards kept: no shard is read for it
        config = self.config
        if config.zeroshot_frequency and not config.zeroshot_eval_dir and inputs.source is not None:
            config = config.model_copy(update={"zeroshot_eval_dir": inputs.source.eval_dir})
        mask = None
        decisions = inputs.decisions.decisions if inputs.decisions else None
        if decisions and decisions != getattr(inputs.shards, "applied", None):
            mask = write_kept_mask(shards, decisions, self.stage_dir(ctx) / MASK_DIR)
            ctx.log(
                f"[{self.name}] {mask.kept:,} of {mask.in_count:,} samples kept by {Path(decisions).parent.name}'s "
                f"decisions, read from {len(mask.shards):,} of {len(shards):,} shards through a kept-uid mask"
            )
        manifest = run_train(shards, n_samples, config, self.stage_dir(ctx), tracking, log=ctx.log, mask=mask)
        return self.finished(manifest)
