"""What every Ray Train worker runs: open_clip's model, loss, optimiser groups and schedule over the
streamed shards, zero-shot scoring at checkpoints, step metrics to MLflow, checkpoints to Ray Train,
and the sweep's early stopping decided by rank 0."""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.progress import ProgressWriter
from stages.mlflow_sink import MlflowSink
from stages.train.checkpoints import checkpoint_artifact
from stages.train.config import STATE_FILE, STEP_FILE, ZEROSHOT_FILE, Tracking, TrainConfig, curve_key
from stages.train.early_stop import last_step, record_stop, verdict


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
    from stages.train.data import Mask, batches
    from stages.train.step import backward_step

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
