"""The train stage's configuration: the compute budget and optimiser (DataComp fixes the first five
per scale), augmentation, the names of the files the stage writes, and where rank 0 tracks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from pipeline.models import StrictModel
from pipeline.stage import StageOutputs
from stages.train.early_stop import EarlyStopConfig

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


class TrainOutputs(StageOutputs):
    model: str  # the exported model folder (open_clip config + weights), what evaluate and embed load
    checkpoint: str
    log: str  # train_log.jsonl: one line of metrics per step, replayed by `pipeline sync`
    resumed_from: str = ""
