"""The stages the orchestrator knows: how each is wired to the recipe, run and described.

Stages themselves (in `stages/`) only see their typed config, their input location and a map
function; this module is where the recipe and the outputs of earlier stages are turned into
those arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.config import ConfigError, Recipe
from stages.dedupe import run_dedupe
from stages.demo_pool import generate_pool
from stages.demo_truth import dedupe_quality
from stages.download import run_download
from stages.evaluate import run_evaluate
from stages.hash_shards import run_hash
from stages.manifest import Manifest
from stages.mapping import MapFn, local_map
from stages.reshard import reshard
from stages.train import Tracking, run_train


@dataclass
class RunContext:
    """What a stage adapter may read: the recipe, the run directory, earlier manifests."""

    recipe: Recipe
    run_dir: Path
    map_fn: MapFn = local_map
    manifests: dict[str, Manifest] = field(default_factory=dict)
    base_url: str | None = None
    tracking_uri: str | None = None
    stage_run_id: str | None = None  # the MLflow run of the stage being run

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name


@dataclass(frozen=True)
class PlanRow:
    stage: str
    input: str
    output: str
    estimated_in: int | None
    note: str = ""


@dataclass(frozen=True)
class StageSpec:
    name: str
    summary: str
    run: Callable[[RunContext], Manifest]
    plan: Callable[[Recipe, Path], PlanRow]
    params: Callable[[Recipe], dict[str, Any]]
    upstream: Callable[[Recipe], str | None] = lambda recipe: None  # whose `kept` feeds our `in`


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _estimated_source_rows(recipe: Recipe) -> int | None:
    if recipe.source.kind == "demo":
        return recipe.source.demo.n_samples
    if recipe.source.pool_size:
        return recipe.source.pool_size
    path = Path(recipe.source.path or "")
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows  # metadata only: touches no data
    return None


def _run_demo_pool(ctx: RunContext) -> Manifest:
    if ctx.base_url is None:
        raise RuntimeError("the demo pool server is not running")
    return generate_pool(ctx.recipe.source.demo, ctx.stage_dir("demo_pool"), ctx.base_url)


def _plan_demo_pool(recipe: Recipe, run_dir: Path) -> PlanRow:
    demo = recipe.source.demo
    return PlanRow(
        "demo_pool",
        f"generated (seed {demo.seed}, {demo.n_eval} eval images)",
        str(run_dir / "demo_pool"),
        demo.n_samples,
        "served on 127.0.0.1 during the run",
    )


def download_source(recipe: Recipe, ctx: RunContext) -> tuple[str, str, str]:
    """(table path, url column, caption column) that the download stage reads."""
    if recipe.source.kind == "demo":
        return ctx.manifests["demo_pool"].outputs["source"], "url", "caption"
    return str(recipe.source.path), recipe.source.url_col, recipe.source.caption_col


def _run_download(ctx: RunContext) -> Manifest:
    path, url_col, caption_col = download_source(ctx.recipe, ctx)
    return run_download(path, ctx.recipe.download, ctx.stage_dir("download"), url_col, caption_col, map_fn=ctx.map_fn)


def _plan_download(recipe: Recipe, run_dir: Path) -> PlanRow:
    rows = _estimated_source_rows(recipe)
    source = "demo_pool/source.parquet" if recipe.source.kind == "demo" else str(recipe.source.path)
    note = ""
    if rows:
        shards = math.ceil(rows / recipe.download.samples_per_shard)
        # jpg at this size is roughly a tenth of its raw RGB bytes; a rough, documented guess
        size = rows * recipe.download.image_size**2 * 3 / 10
        note = f"{shards:,} shards of {recipe.download.samples_per_shard:,}, ~{human_bytes(size)}"
    return PlanRow("download", source, str(run_dir / "download" / "shards"), rows, note)


def _run_phash(ctx: RunContext) -> Manifest:
    shards_dir = Path(ctx.manifests["download"].outputs["shards_dir"])
    return run_hash(shards_dir, ctx.recipe.phash, ctx.stage_dir("phash"), map_fn=ctx.map_fn)


def _plan_phash(recipe: Recipe, run_dir: Path) -> PlanRow:
    return PlanRow(
        "phash",
        str(run_dir / "download" / "shards"),
        str(run_dir / "phash" / "hashes"),
        _estimated_source_rows(recipe),
        "64-bit pHash per image, imagehash-compatible",
    )


def _run_dedupe(ctx: RunContext) -> Manifest:
    config = ctx.recipe.dedupe
    demo = ctx.recipe.source.kind == "demo"
    if demo:  # the demo's held-out set is always protected from leakage
        eval_tar = str(Path(ctx.manifests["demo_pool"].outputs["eval"]) / "*.tar")
        config = config.model_copy(update={"eval_sets": [*config.eval_sets, eval_tar]})
    manifest = run_dedupe(Path(ctx.manifests["phash"].outputs["hashes_dir"]), config, ctx.stage_dir("dedupe"))
    if demo:
        truth = pq.read_table(ctx.manifests["demo_pool"].outputs["ground_truth"])
        decisions = pq.read_table(manifest.outputs["decisions"])
        manifest.metrics.update(dedupe_quality(decisions, truth))
    return manifest


def _plan_dedupe(recipe: Recipe, run_dir: Path) -> PlanRow:
    d = recipe.dedupe
    evals = len(d.eval_sets) + (1 if recipe.source.kind == "demo" else 0)
    return PlanRow(
        "dedupe",
        str(run_dir / "phash" / "hashes"),
        str(run_dir / "dedupe" / "decisions.parquet"),
        _estimated_source_rows(recipe),
        f"Hamming <= {d.max_distance}, keep {d.keep}, {evals} eval set(s)",
    )


def _run_subset(ctx: RunContext) -> Manifest:
    """The kept uids as new shards; everything left out is counted under its dedupe reason."""
    decisions = pq.read_table(ctx.manifests["dedupe"].outputs["decisions"]).to_pydict()
    rows = list(zip(decisions["uid"], decisions["keep"], decisions["reason"], strict=True))
    shards = sorted(Path(ctx.manifests["download"].outputs["shards_dir"]).glob("*.tar"))
    return reshard(
        shards,
        ctx.stage_dir("subset") / "shards",
        ctx.recipe.subset.samples_per_shard,
        keep_uids={uid for uid, keep, _ in rows if keep},
        stage="subset",
        drop_reasons={uid: reason.split(":", 1)[0] for uid, keep, reason in rows if not keep},  # duplicate_of
        default_reason="not_hashed",  # downloaded samples the phash stage could not decode
    )


def _plan_subset(recipe: Recipe, run_dir: Path) -> PlanRow:
    return PlanRow(
        "subset",
        "download shards + dedupe decisions",
        str(run_dir / "subset" / "shards"),
        _estimated_source_rows(recipe),
        f"shards of {recipe.subset.samples_per_shard:,}",
    )


def _training_source(recipe: Recipe) -> str:
    return "subset" if "subset" in recipe.stages else "download"


def _run_train(ctx: RunContext) -> Manifest:
    source = ctx.manifests[_training_source(ctx.recipe)]
    shards = sorted(str(p) for p in Path(source.outputs["shards_dir"]).glob("*.tar"))
    tracking = Tracking(ctx.tracking_uri, ctx.stage_run_id) if ctx.tracking_uri and ctx.stage_run_id else None
    return run_train(shards, source.kept, ctx.recipe.train, ctx.stage_dir("train"), tracking)


def _plan_train(recipe: Recipe, run_dir: Path) -> PlanRow:
    t = recipe.train
    device = "GPU" if t.use_gpu else "CPU"
    return PlanRow(
        "train",
        str(run_dir / _training_source(recipe) / "shards"),
        str(run_dir / "train" / "model"),
        _estimated_source_rows(recipe),
        f"{t.model}, {t.samples_seen:,} samples seen = {t.total_steps:,} steps of {t.batch_size:,}, "
        f"{t.workers} {device} worker(s), checkpoint every {t.checkpoint_every_steps:,} steps",
    )


def _eval_dir(recipe: Recipe, ctx: RunContext | None = None) -> str:
    if recipe.evaluate.eval_dir:
        return recipe.evaluate.eval_dir
    if ctx is not None:
        return ctx.manifests["demo_pool"].outputs["eval"]
    return "demo_pool/eval"


def _run_evaluate(ctx: RunContext) -> Manifest:
    model_dir = Path(ctx.manifests["train"].outputs["model"])
    return run_evaluate(model_dir, Path(_eval_dir(ctx.recipe, ctx)), ctx.recipe.evaluate, ctx.stage_dir("evaluate"))


def _plan_evaluate(recipe: Recipe, run_dir: Path) -> PlanRow:
    return PlanRow(
        "evaluate",
        _eval_dir(recipe),
        str(run_dir / "evaluate" / "results.json"),
        None,
        "zero-shot top-1/top-5, retrieval R@1/5/10",
    )


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec(
            "demo_pool",
            "generate the demo pool, its ground truth and eval set",
            _run_demo_pool,
            _plan_demo_pool,
            lambda r: r.source.demo.model_dump(),
        ),
        StageSpec(
            "download",
            "img2dataset on Ray into uid-keyed webdataset shards",
            _run_download,
            _plan_download,
            lambda r: r.download.model_dump(),
            upstream=lambda r: "demo_pool" if r.source.kind == "demo" else None,
        ),
        StageSpec(
            "phash",
            "perceptual hash of every image, batched, one Ray task per shard",
            _run_phash,
            _plan_phash,
            lambda r: r.phash.model_dump(),
            upstream=lambda r: "download",
        ),
        StageSpec(
            "dedupe",
            "near-duplicate clusters and eval-set leakage over all hashes",
            _run_dedupe,
            _plan_dedupe,
            lambda r: r.dedupe.model_dump(),
            upstream=lambda r: "phash",
        ),
        StageSpec(
            "subset",
            "materialise the kept samples as new shards",
            _run_subset,
            _plan_subset,
            lambda r: r.subset.model_dump(),
            upstream=lambda r: "download",
        ),
        StageSpec(
            "train",
            "CLIP training with Ray Train (TorchTrainer), checkpoints in MLflow",
            _run_train,
            _plan_train,
            lambda r: r.train.model_dump(),
            upstream=_training_source,
        ),
        StageSpec(
            "evaluate",
            "zero-shot classification and retrieval on the held-out set",
            _run_evaluate,
            _plan_evaluate,
            lambda r: r.evaluate.model_dump(),
        ),
    ]
}


def validate_stages(recipe: Recipe) -> list[StageSpec]:
    """Check the recipe's stage list: names exist, no repeats, inputs come before use."""
    seen: list[str] = []
    for name in recipe.stages:
        if name not in STAGES:
            raise ConfigError(
                f"invalid recipe '{recipe.name}': stages: unknown stage '{name}' (available: {', '.join(STAGES)})"
            )
        if name in seen:
            raise ConfigError(f"invalid recipe '{recipe.name}': stages: '{name}' is listed twice")
        seen.append(name)
    if recipe.source.kind == "demo" and "download" in seen and "demo_pool" not in seen[: seen.index("download")]:
        raise ConfigError(
            f"invalid recipe '{recipe.name}': stages: source.kind 'demo' needs 'demo_pool' before 'download'"
        )
    for stage, needs in (
        ("phash", "download"),
        ("dedupe", "phash"),
        ("subset", "dedupe"),
        ("train", "download"),
        ("evaluate", "train"),
    ):
        if stage in seen and needs not in seen[: seen.index(stage)]:
            raise ConfigError(f"invalid recipe '{recipe.name}': stages: '{stage}' needs '{needs}' before it")
    if "evaluate" in seen and recipe.source.kind != "demo" and not recipe.evaluate.eval_dir:
        raise ConfigError(f"invalid recipe '{recipe.name}': evaluate.eval_dir is needed outside the demo")
    if recipe.source.kind != "demo" and "demo_pool" in seen:
        raise ConfigError(f"invalid recipe '{recipe.name}': stages: 'demo_pool' needs source.kind 'demo'")
    return [STAGES[name] for name in recipe.stages]
