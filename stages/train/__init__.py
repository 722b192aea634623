"""Train stage: CLIP training with Ray Train's TorchTrainer on open_clip models.

Each worker streams the shards (`stages.train.data`), trains with open_clip's ClipLoss (learnable
temperature, local loss, gathered features), AdamW with open_clip's no-weight-decay groups,
open_clip's cosine schedule with warmup, gradient clipping, and bf16 autocast on GPU. The budget
is samples seen, as DataComp fixes it per scale. Every `checkpoint_every_samples` the state
(model, optimiser, step) is reported to Ray Train as a checkpoint (the final one, and every
`mlflow_checkpoint_every`-th if set, is copied to MLflow); a rerun
resumes from the latest one and sees the same batches an uninterrupted run would have.

The package: `config` (TrainConfig), `data` (the streaming loader), `step` (one optimiser step with
accumulation), `loop` (what each Ray Train worker runs), `checkpoints` (resume, cleanup, export),
`fit` (one run of the stage); this module is the stage itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.budget import training_budget
from pipeline.manifest import Manifest
from pipeline.stage import (
    Decisions,
    MissingInput,
    PlanRow,
    Resources,
    RunContext,
    Shards,
    SourceOutputs,
    Stage,
    earlier_source,
)
from stages.selection import MASK_DIR, write_kept_mask
from stages.train.checkpoints import checkpoint_problem, choose_checkpoint, latest_checkpoint
from stages.train.config import STATE_FILE, STEP_FILE, Tracking, TrainConfig, TrainOutputs, curve_key
from stages.train.fit import run_train
from stages.train.loop import parameter_groups

__all__ = [
    "STATE_FILE",
    "STEP_FILE",
    "Train",
    "TrainConfig",
    "TrainInputs",
    "TrainOutputs",
    "Tracking",
    "checkpoint_problem",
    "choose_checkpoint",
    "curve_key",
    "latest_checkpoint",
    "parameter_groups",
    "run_train",
]


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
        if decisions and decisions != inputs.shards.applied:
            mask = write_kept_mask(shards, decisions, self.stage_dir(ctx) / MASK_DIR)
            ctx.log(
                f"[{self.name}] {mask.kept:,} of {mask.in_count:,} samples kept by {Path(decisions).parent.name}'s "
                f"decisions, read from {len(mask.shards):,} of {len(shards):,} shards through a kept-uid mask"
            )
        manifest = run_train(shards, n_samples, config, self.stage_dir(ctx), tracking, log=ctx.log, mask=mask)
        return self.finished(manifest)
