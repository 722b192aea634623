"""Seed-models stage: train the pool's own scoring CLIPs, when no checkpoint is given.

Two models, as in the Data Filtering Networks paper: a reference CLIP trained on the uncurated
pool itself (what a CLIP trained on web data sees; no labels involved), and a *filtering
network*: that CLIP fine-tuned on the labelled pairs the labels call good (the paper fine-tunes
a pretrained CLIP on high-quality data; `dfn_from: scratch` trains it from random weights on the
good pairs alone, as this stage did before, at the reference's full budget). The embed stage scores the
whole pool with both: `clip_score` with the first, `dfn_score` with the second. Real pools pass
their own checkpoints to the embed stage instead (e.g. an OpenAI or DFN CLIP saved on disk) and
skip this stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.manifest import Manifest, count_reasons
from pipeline.models import StrictModel
from pipeline.stage import PlanRow, RunContext, SourceOutputs, Stage, StageOutputs, check_labels
from stages import clip_models
from stages.dedupe import DedupeOutputs
from stages.download import DownloadOutputs, downloaded_rows
from stages.shard_copy import reshard
from stages.shards import read_decisions
from stages.train import TrainConfig, TrainOutputs, run_train

SEED_TRAIN_DEFAULTS = TrainConfig(
    model="demo-tiny",
    samples_seen=6400,
    batch_size=64,
    lr=1e-3,
    warmup=20,
    weight_decay=0.1,
    workers=1,
    threads_per_worker=2,
    checkpoint_every_samples=6400,
)


class SeedModelsConfig(StrictModel):
    labels: str | None = Field(None, description="parquet with uid and good_pair (bool); default: the demo's labels")
    clip_on: Literal["pool", "labelled"] = Field("pool", description="reference CLIP data: the whole pool or labels")
    train: TrainConfig = SEED_TRAIN_DEFAULTS
    dfn: bool = Field(True, description="also train the filtering network on the good pairs")
    dfn_from: Literal["reference", "scratch"] = Field(
        "reference", description="the filtering network fine-tunes the reference CLIP, or starts from random weights"
    )
    dfn_samples_seen: int | None = Field(
        None,
        gt=0,
        description="its training budget; default: a quarter of train.samples_seen fine-tuned, all of it from scratch",
    )


def dfn_samples_seen(config: SeedModelsConfig) -> int:
    """The filtering network's budget: as set, else a quarter of the reference's when fine-tuned
    (at least one batch) and all of it from scratch."""
    if config.dfn_samples_seen:
        return config.dfn_samples_seen
    base = config.train
    return base.samples_seen if config.dfn_from == "scratch" else max(base.step_batch, base.samples_seen // 4)


def dfn_train_config(config: SeedModelsConfig, reference_model: str) -> TrainConfig:
    """The filtering network's training run: the reference's settings, from its weights unless
    `dfn_from: scratch`, for `dfn_samples_seen` samples (warm-up at most a fifth of its steps)."""
    base, samples = config.train, dfn_samples_seen(config)
    if config.dfn_from == "scratch":
        return TrainConfig.model_validate({**base.model_dump(), "samples_seen": samples})
    steps = max(1, samples // base.step_batch)
    update = {
        "samples_seen": samples,
        "pretrained": reference_model,
        "warmup": min(base.warmup, max(1, steps // 5)),
        "checkpoint_every_samples": min(base.checkpoint_every_samples, samples),
    }
    return TrainConfig.model_validate({**base.model_dump(), **update})


def _train_on(shards: list[Path], uids: set[str], config: TrainConfig, folder: Path) -> tuple[str, Manifest | None]:
    """Reshard `uids` and train on them; a model already exported is reused (resume)."""
    model_dir = folder / "train" / "model"
    if (model_dir / clip_models.WEIGHTS).exists():
        return str(model_dir), None
    subset = reshard(shards, folder / "shards", 10_000, keep=uids, stage="seed")
    tars = sorted(str(p) for p in (folder / "shards").glob("*.tar"))
    manifest = run_train(tars, subset.kept, config, folder / "train")
    return TrainOutputs.model_validate(manifest.outputs).model, manifest


def run_seed_models(
    shards: list[Path], labels: pa.Table, usable_uids: set[str], config: SeedModelsConfig, stage_dir: Path
) -> Manifest:
    """Train the reference CLIP on `usable_uids` (or its labelled part) and the filtering network on
    the good labelled pairs among them."""
    started = time.perf_counter()
    if "uid" not in labels.column_names or (config.dfn and "good_pair" not in labels.column_names):
        raise ValueError("seed_models: the labels table needs columns uid and good_pair")
    uids = labels.column("uid").to_pylist()
    good = labels.column("good_pair").fill_null(False).to_pylist() if config.dfn else [True] * len(uids)
    reasons = [None if u in usable_uids else "not_in_pool" for u in uids]
    usable = {u for u, r in zip(uids, reasons, strict=True) if r is None}
    metrics: dict[str, float] = {}
    reference = usable_uids if config.clip_on == "pool" else usable
    clip_model, clip_run = _train_on(shards, reference, config.train, stage_dir / "clip")
    dfn_model = None
    metrics["clip_pairs"] = float(len(reference))
    if config.dfn:
        curated = {u for u, g in zip(uids, good, strict=True) if g and u in usable}
        dfn_model, _ = _train_on(shards, curated, dfn_train_config(config, clip_model), stage_dir / "dfn")
        metrics["dfn_pairs"] = float(len(curated))
    if clip_run is not None:
        metrics["clip_train_seconds"] = clip_run.seconds
    metrics["labelled_good_pairs"] = float(sum(good)) if config.dfn else 0.0
    return Manifest(
        stage="seed_models",
        **{"in": len(uids)},
        kept=len(usable),
        dropped=count_reasons([r for r in reasons if r is not None]),
        outputs=SeedModelsOutputs(clip_model=clip_model, dfn_model=dfn_model).as_dict(),
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )


class SeedModelsOutputs(StageOutputs):
    clip_model: str  # the reference CLIP: embed's scoring model unless embed.model is set
    dfn_model: str | None = None  # the filtering network (seed_models.dfn)


@dataclass
class SeedModelsInputs:
    shards: DownloadOutputs
    dedupe: DedupeOutputs | None = None  # never train on duplicates or copies of evaluation images
    source: SourceOutputs | None = None  # its labels, unless seed_models.labels is set


class SeedModels(Stage):
    name = "seed_models"
    summary = "train the reference CLIP and filtering network on the labelled slice"
    config_model = SeedModelsConfig
    Inputs = SeedModelsInputs
    Outputs = SeedModelsOutputs

    def check(self, before: list[Stage]) -> None:
        check_labels(self, self.config.labels, before)

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        t = self.config.train
        note = f"reference CLIP: {t.model}, {t.samples_seen:,} samples seen"
        if self.config.dfn:
            start = "fine-tuned from it" if self.config.dfn_from == "reference" else "from scratch"
            note += f"; filtering network {start}, {dfn_samples_seen(self.config):,}"
        labels = self.config.labels or "the source's labels"
        return PlanRow(self.name, labels, str(run_dir / self.name), None, note, f"{t.workers} train worker(s)")

    def run(self, ctx: RunContext, inputs: SeedModelsInputs) -> tuple[SeedModelsOutputs, Manifest]:
        labels = pq.read_table(self.config.labels or inputs.source.labels)
        if inputs.dedupe is not None:
            decisions = read_decisions(inputs.dedupe.decisions, ["uid", "keep"])
            usable = set(decisions.filter(decisions.column("keep")).column("uid").to_pylist())
        else:
            usable = set(downloaded_rows(Path(inputs.shards.shards_dir)).column("uid").to_pylist())
        shards = sorted(Path(inputs.shards.shards_dir).glob("*.tar"))
        manifest = run_seed_models(shards, labels, usable, self.config, self.stage_dir(ctx))
        return self.finished(manifest)
