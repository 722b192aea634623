"""Seed-models stage: train the pool's own scoring CLIPs, when no checkpoint is given.

Two models, as in the Data Filtering Networks paper: a reference CLIP trained on the uncurated
pool itself (what a CLIP trained on web data sees; no labels involved), and a *filtering
network* trained only on the labelled pairs the labels call good. The embed stage scores the
whole pool with both: `clip_score` with the first, `dfn_score` with the second. Real pools pass
their own checkpoints to the embed stage instead (e.g. an OpenAI or DFN CLIP saved on disk) and
skip this stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field

from stages import clip_models
from stages.config_base import StrictModel
from stages.manifest import Manifest, count_reasons
from stages.reshard import reshard
from stages.train import TrainConfig, run_train

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


def _train_on(shards: list[Path], uids: set[str], config: TrainConfig, folder: Path) -> tuple[str, Manifest | None]:
    """Reshard `uids` and train on them; a model already exported is reused (resume)."""
    model_dir = folder / "train" / "model"
    if (model_dir / clip_models.WEIGHTS).exists():
        return str(model_dir), None
    subset = reshard(shards, folder / "shards", 10_000, keep_uids=uids, stage="seed")
    tars = sorted(str(p) for p in (folder / "shards").glob("*.tar"))
    manifest = run_train(tars, subset.kept, config, folder / "train")
    return manifest.outputs["model"], manifest


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
    outputs, metrics = {}, {}
    reference = usable_uids if config.clip_on == "pool" else usable
    outputs["clip_model"], clip_run = _train_on(shards, reference, config.train, stage_dir / "clip")
    metrics["clip_pairs"] = float(len(reference))
    if config.dfn:
        curated = {u for u, g in zip(uids, good, strict=True) if g and u in usable}
        outputs["dfn_model"], _ = _train_on(shards, curated, config.train, stage_dir / "dfn")
        metrics["dfn_pairs"] = float(len(curated))
    if clip_run is not None:
        metrics["clip_train_seconds"] = clip_run.seconds
    metrics["labelled_good_pairs"] = float(sum(good)) if config.dfn else 0.0
    return Manifest(
        stage="seed_models",
        **{"in": len(uids)},
        kept=len(usable),
        dropped=count_reasons([r for r in reasons if r is not None]),
        outputs=outputs,
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )
