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

from filters.heads import HeadError, load_head
from filters.strategy import missing_columns
from pipeline.budget import storage_estimate
from pipeline.config import ConfigError, Recipe
from stages import clip_models
from stages.class_embeddings import write_class_embeddings
from stages.dedupe import run_dedupe
from stages.demo_pool import generate_pool
from stages.demo_truth import dedupe_quality, filter_quality
from stages.download import run_download
from stages.embed import run_embed
from stages.evaluate import read_classnames, run_evaluate
from stages.filter_pool import run_filter
from stages.filter_report import write_report
from stages.fit_heads import run_fit_heads
from stages.hash_shards import run_hash
from stages.manifest import Manifest
from stages.mapping import MapFn, local_map
from stages.pool_table import build_pool_table, downloaded_rows
from stages.reshard import reshard
from stages.seed_models import run_seed_models
from stages.train import Tracking, run_train

VOCABULARY_FILTERS = ("text_based", "metaclip_balance")  # default vocabulary: the eval set's class names


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


def estimated_source_rows(recipe: Recipe) -> int | None:
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
    rows = estimated_source_rows(recipe)
    source = "demo_pool/source.parquet" if recipe.source.kind == "demo" else str(recipe.source.path)
    note = ""
    if rows:
        shards = math.ceil(rows / recipe.download.samples_per_shard)
        size = storage_estimate(rows, recipe.download.image_size, None).shards
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
        estimated_source_rows(recipe),
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
        estimated_source_rows(recipe),
        f"Hamming <= {d.max_distance}, keep {d.keep}, {evals} eval set(s)",
    )


def _shard_paths(ctx: RunContext) -> list[Path]:
    return sorted(Path(ctx.manifests["download"].outputs["shards_dir"]).glob("*.tar"))


def _decision_stage(recipe: Recipe) -> str:
    """Whose decisions a subset materialises: the filter strategy's, else dedupe's alone."""
    return "filter" if "filter" in recipe.stages else "dedupe"


def _subset_reason(reason: str) -> str:
    if reason.startswith("failed:"):
        return reason
    return reason.split(":", 1)[0] if reason.startswith(("duplicate_of:", "eval_duplicate_of:")) else reason


def _run_subset(ctx: RunContext) -> Manifest:
    """The kept uids as new shards; everything left out is counted under its filter's reason."""
    decisions = pq.read_table(ctx.manifests[_decision_stage(ctx.recipe)].outputs["decisions"]).to_pydict()
    rows = list(zip(decisions["uid"], decisions["keep"], decisions["reason"], strict=True))
    return reshard(
        _shard_paths(ctx),
        ctx.stage_dir("subset") / "shards",
        ctx.recipe.subset.samples_per_shard,
        keep_uids={uid for uid, keep, _ in rows if keep},
        stage="subset",
        drop_reasons={uid: _subset_reason(reason) for uid, keep, reason in rows if not keep},
        default_reason="not_hashed",  # downloaded samples the phash stage could not decode
    )


def _plan_subset(recipe: Recipe, run_dir: Path) -> PlanRow:
    return PlanRow(
        "subset",
        f"download shards + {_decision_stage(recipe)} decisions",
        str(run_dir / "subset" / "shards"),
        estimated_source_rows(recipe),
        f"shards of {recipe.subset.samples_per_shard:,}",
    )


def _labels_path(ctx: RunContext, configured: str | None) -> str:
    if configured:
        return configured
    return ctx.manifests["demo_pool"].outputs["labels"]


def _labelled_uids(ctx: RunContext) -> set[str]:
    """uids the run's own filters were fitted on: excluded when scoring filters on the demo."""
    if "demo_pool" not in ctx.manifests:
        return set()
    return set(pq.read_table(ctx.manifests["demo_pool"].outputs["labels"], columns=["uid"]).column("uid").to_pylist())


def _run_seed_models(ctx: RunContext) -> Manifest:
    config = ctx.recipe.seed_models
    labels = pq.read_table(_labels_path(ctx, config.labels))
    if "dedupe" in ctx.manifests:  # never train on duplicates or copies of evaluation images
        decisions = pq.read_table(ctx.manifests["dedupe"].outputs["decisions"], columns=["uid", "keep"])
        usable = set(decisions.filter(decisions.column("keep")).column("uid").to_pylist())
    else:
        usable = set(downloaded_rows(Path(ctx.manifests["download"].outputs["shards_dir"])).column("uid").to_pylist())
    return run_seed_models(_shard_paths(ctx), labels, usable, config, ctx.stage_dir("seed_models"))


def _plan_seed_models(recipe: Recipe, run_dir: Path) -> PlanRow:
    t = recipe.seed_models.train
    what = "reference CLIP + filtering network" if recipe.seed_models.dfn else "reference CLIP"
    return PlanRow(
        "seed_models",
        recipe.seed_models.labels or "demo_pool/labels.parquet",
        str(run_dir / "seed_models"),
        None,
        f"{what}: {t.model}, {t.samples_seen:,} samples seen each",
    )


def _embed_models(ctx: RunContext) -> tuple[str, str | None]:
    """(scoring model, filtering network): the recipe's paths, else what seed_models trained."""
    config = ctx.recipe.embed
    seed = ctx.manifests.get("seed_models")
    model = config.model or (seed.outputs["clip_model"] if seed else None)
    dfn = config.dfn_model or (seed.outputs.get("dfn_model") if seed else None)
    if model is None:
        raise ValueError("embed needs embed.model (a saved model folder or checkpoint) or the seed_models stage")
    return model, dfn


def _run_embed(ctx: RunContext) -> Manifest:
    model, dfn = _embed_models(ctx)
    config = ctx.recipe.embed.model_copy(update={"dfn_model": dfn})
    shards_dir = Path(ctx.manifests["download"].outputs["shards_dir"])
    manifest = run_embed(shards_dir, config, ctx.stage_dir("embed"), model)
    classnames = eval_classnames(ctx.recipe, ctx.manifests)
    if classnames:  # default targets of the image_based filter
        path = write_class_embeddings(
            model,
            config.model_name,
            classnames,
            ctx.recipe.evaluate.templates,
            ctx.stage_dir("embed") / "class_embeddings.npy",
        )
        manifest.outputs["class_embeddings"] = str(path)
    return manifest


def _plan_embed(recipe: Recipe, run_dir: Path) -> PlanRow:
    e = recipe.embed
    extras = [
        name
        for name, on in (("dfn_score", e.dfn_model or "seed_models" in recipe.stages), ("nsfw_onnx", e.nsfw_onnx))
        if on
    ]
    return PlanRow(
        "embed",
        str(run_dir / "download" / "shards"),
        str(run_dir / "embed" / "embeddings"),
        estimated_source_rows(recipe),
        f"{e.model or 'seed_models clip'} via Ray Data, batch {e.batch_size}; clip_score"
        + "".join(f", {x}" for x in extras),
    )


def _run_heads(ctx: RunContext) -> Manifest:
    config = ctx.recipe.heads
    labels = pq.read_table(_labels_path(ctx, config.labels))
    embed = ctx.manifests["embed"]
    return run_fit_heads(
        Path(embed.outputs["embeddings_dir"]), labels, config, ctx.stage_dir("heads"), embed.outputs["model"]
    )


def _plan_heads(recipe: Recipe, run_dir: Path) -> PlanRow:
    h = recipe.heads
    return PlanRow(
        "heads",
        h.labels or "demo_pool/labels.parquet",
        str(run_dir / "heads"),
        None,
        f"{', '.join(h.heads)} head(s) on image embeddings, {h.epochs} epochs",
    )


def eval_classnames(recipe: Recipe, manifests: dict[str, Manifest]) -> list[str] | None:
    """The evaluation set's class names: the recipe's eval_dir, else the demo's held-out set."""
    if recipe.evaluate.eval_dir:
        return read_classnames(Path(recipe.evaluate.eval_dir))
    if "demo_pool" in manifests:
        return read_classnames(Path(manifests["demo_pool"].outputs["eval"]))
    return None


def resolved_strategy(manifests: dict[str, Manifest], recipe: Recipe) -> list:
    """The strategy with run-made defaults filled in: fitted heads, eval class names, class embeddings."""
    heads = manifests.get("heads")
    class_embeddings = manifests["embed"].outputs.get("class_embeddings") if "embed" in manifests else None
    steps = []
    for params in recipe.filter.strategy:
        update: dict[str, object] = {}
        if getattr(params, "head", "unset") is None and heads is not None:
            update["head"] = heads.outputs.get(f"{params.name}_head")
        if params.name in VOCABULARY_FILTERS and not (params.words or params.vocabulary):
            update["words"] = eval_classnames(recipe, manifests)
        if params.name == "image_based" and not params.targets:
            update["targets"] = class_embeddings
        steps.append(params.model_copy(update={k: v for k, v in update.items() if v is not None}))
    return steps


def _run_filter(ctx: RunContext) -> Manifest:
    m = ctx.manifests
    pool = build_pool_table(
        Path(m["download"].outputs["shards_dir"]),
        hashes_dir=Path(m["phash"].outputs["hashes_dir"]) if "phash" in m else None,
        decisions_path=Path(m["dedupe"].outputs["decisions"]) if "dedupe" in m else None,
        embeddings_dir=Path(m["embed"].outputs["embeddings_dir"]) if "embed" in m else None,
    )
    config = ctx.recipe.filter.model_copy(update={"strategy": resolved_strategy(m, ctx.recipe)})
    stage_dir = ctx.stage_dir("filter")
    manifest, result = run_filter(pool, config, stage_dir, ctx.map_fn)
    captions = dict(zip(pool.column("uid").to_pylist(), pool.column("caption").to_pylist(), strict=True))
    report = write_report(result, captions, _shard_paths(ctx), config.examples, stage_dir / "report")
    manifest.outputs["artifacts"] = str(report)
    if "demo_pool" in m:
        truth = pq.read_table(m["demo_pool"].outputs["ground_truth"])
        manifest.metrics.update(filter_quality(result, truth, exclude=_labelled_uids(ctx)))
    return manifest


def _plan_filter(recipe: Recipe, run_dir: Path) -> PlanRow:
    steps = " ∩ ".join(_describe_step(p) for p in recipe.filter.strategy) or "(keep all)"
    return PlanRow("filter", "per-uid pool table", str(run_dir / "filter" / "decisions.parquet"), None, steps)


def _describe_step(params) -> str:
    fields = {k: v for k, v in params.model_dump().items() if k != "name" and v is not None}
    return f"{params.name}({', '.join(f'{k}={v}' for k, v in fields.items())})"


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
        estimated_source_rows(recipe),
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
            "seed_models",
            "train the reference CLIP and filtering network on the labelled slice",
            _run_seed_models,
            _plan_seed_models,
            lambda r: r.seed_models.model_dump(),
        ),
        StageSpec(
            "embed",
            "CLIP image/text embeddings and pair scores, Ray Data actor pool",
            _run_embed,
            _plan_embed,
            lambda r: r.embed.model_dump(),
            upstream=lambda r: "download",
        ),
        StageSpec(
            "heads",
            "fit the aesthetic and NSFW heads on labelled embeddings",
            _run_heads,
            _plan_heads,
            lambda r: r.heads.model_dump(),
        ),
        StageSpec(
            "filter",
            "apply the filter strategy to the per-uid pool table",
            _run_filter,
            _plan_filter,
            lambda r: r.filter.model_dump(),
            upstream=lambda r: "download",
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
        ("subset", _decision_stage(recipe)),
        ("seed_models", "download"),
        ("embed", "download"),
        ("heads", "embed"),
        ("filter", "download"),
        ("train", "download"),
        ("evaluate", "train"),
    ):
        if stage in seen and needs not in seen[: seen.index(stage)]:
            raise ConfigError(f"invalid recipe '{recipe.name}': stages: '{stage}' needs '{needs}' before it")
    _check_models_and_labels(recipe, seen)
    if "filter" in seen:
        _check_strategy(recipe, seen)
    if "evaluate" in seen and recipe.source.kind != "demo" and not recipe.evaluate.eval_dir:
        raise ConfigError(f"invalid recipe '{recipe.name}': evaluate.eval_dir is needed outside the demo")
    if recipe.source.kind != "demo" and "demo_pool" in seen:
        raise ConfigError(f"invalid recipe '{recipe.name}': stages: 'demo_pool' needs source.kind 'demo'")
    return [STAGES[name] for name in recipe.stages]


def _fail(recipe: Recipe, message: str) -> ConfigError:
    return ConfigError(f"invalid recipe '{recipe.name}': {message}")


def _check_models_and_labels(recipe: Recipe, seen: list[str]) -> None:
    """Model and label files exist before any stage runs."""
    demo = recipe.source.kind == "demo"
    if "embed" in seen:
        before = seen[: seen.index("embed")]
        if not recipe.embed.model and "seed_models" not in before:
            raise _fail(
                recipe, "embed.model is needed (a saved model folder or checkpoint) unless seed_models runs first"
            )
        for key in ("model", "dfn_model"):
            path = getattr(recipe.embed, key)
            if path and not Path(path).exists():
                raise _fail(recipe, f"embed.{key}: not found: {path}")
            if path and Path(path).is_file() and not getattr(recipe.embed, f"{key}_name"):
                raise _fail(recipe, f"embed.{key}_name: the open_clip architecture of {path} is needed")
    for stage in ("seed_models", "heads"):
        labels = getattr(recipe, stage).labels
        if stage in seen and not labels and not demo:
            raise _fail(recipe, f"{stage}.labels is needed (a parquet of labelled uids) outside the demo")
        if stage in seen and labels and not Path(labels).exists():
            raise _fail(recipe, f"{stage}.labels: not found: {labels}")


def embedding_width(recipe: Recipe) -> int | None:
    if recipe.embed.model and Path(recipe.embed.model).exists():
        return clip_models.embed_dim(recipe.embed.model, recipe.embed.model_name)
    if not recipe.embed.model and "seed_models" in recipe.stages:
        return clip_models.embed_dim(None, recipe.seed_models.train.model)
    return None


def _check_filter_inputs(recipe: Recipe, before: list[str]) -> None:
    """Vocabulary and target files exist, and run-made defaults (eval class names) will exist."""
    has_classes = bool(recipe.evaluate.eval_dir) or "demo_pool" in before
    for params in recipe.filter.strategy:
        paths = [getattr(params, key, None) for key in ("vocabulary", "targets")]
        for path in filter(None, paths):
            if not Path(path).is_file():
                raise _fail(recipe, f"filter '{params.name}': file not found: {path}")
        if params.name in VOCABULARY_FILTERS and not (params.words or params.vocabulary) and not has_classes:
            raise _fail(recipe, f"filter '{params.name}' needs words or vocabulary (no eval class names to default to)")
        if params.name == "image_based" and not params.targets and not (has_classes and "embed" in before):
            raise _fail(recipe, "filter 'image_based' needs targets=<.npy> (or eval class names and the embed stage)")


def _check_strategy(recipe: Recipe, seen: list[str]) -> None:
    """Every filter of the strategy can run: its columns will exist and its head fits the embeddings."""
    before = seen[: seen.index("filter")]
    columns = ["uid", "caption", "original_width", "original_height"]
    if "dedupe" in before:
        columns += ["dedupe_keep", "dedupe_reason"]
    if "embed" in before:
        columns += ["image_emb", "text_emb", "clip_score"]
        if recipe.embed.dfn_model or ("seed_models" in before and recipe.seed_models.dfn):
            columns.append("dfn_score")
        if recipe.embed.nsfw_onnx:
            columns.append("nsfw_onnx")
    hints = {
        "dedupe_keep": "run the dedupe stage",
        "dfn_score": "set embed.dfn_model",
        "nsfw_onnx": "set embed.nsfw_onnx=true",
    }
    for name, column in missing_columns(columns, recipe.filter.strategy):
        hint = hints.get(column, "run the embed stage")
        raise _fail(recipe, f"filter '{name}' needs '{column}': {hint}")
    _check_filter_inputs(recipe, before)
    width = embedding_width(recipe) if "embed" in before else None
    for params in recipe.filter.strategy:
        head = getattr(params, "head", "unset")
        if head == "unset" or (params.name == "nsfw" and params.backend != "head"):
            continue
        if head is None:
            if "heads" not in before:
                raise _fail(recipe, f"filter '{params.name}' needs head=<path> or the heads stage before filter")
            continue
        try:
            _, info = load_head(head, "binary" if params.name == "nsfw" else "regression")
        except HeadError as err:
            raise _fail(recipe, f"filter '{params.name}': {err}") from None
        if width is not None and info.input_dim != width:
            raise _fail(
                recipe,
                f"filter '{params.name}': head takes {info.input_dim}-dim embeddings but the embed model gives {width}",
            )
