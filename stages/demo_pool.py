"""Generate the demo's captioned image pool, its ground truth, and a held-out evaluation set.

The pool is written as files plus a url/caption table pointing at a loopback HTTP server, so the
demo exercises the real download path. Every planted defect is recorded in `ground_truth.parquet`
keyed by the same uid the download stage computes, so later stages can be scored against it.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import AliasChoices, Field, model_validator

from pipeline.atomic import atomic_path, write_bytes, write_json, write_parquet
from pipeline.manifest import Manifest, count_reasons
from pipeline.models import StrictModel
from pipeline.serve import serve_directory
from pipeline.stage import PlanRow, RunContext, SourceOutputs, Stage, StageOutputs
from stages import demo_scenes as world
from stages.dedupe import DedupeOutputs
from stages.demo_truth import dedupe_quality, filter_quality
from stages.filter import FilterOutputs
from stages.shards import read_decisions
from stages.uid import compute_uid

CONNECTION_REFUSED_BASE = "http://127.0.0.1:9"  # the discard port: nothing listens on loopback
NON_ENGLISH_CAPTIONS = [
    "une photo de vacances au bord de la mer avec des amis",
    "ein schönes Bild von unserem Garten im Sommer",
    "foto del producto disponible en nuestra tienda en línea",
    "immagine della nuova collezione di primavera in negozio",
    "zdjęcie naszego domu w górach zimą",
]
GOOD_PAIR_DEFECTS = {"clean", "exact_duplicate", "near_duplicate", "slow"}


class DefectFractions(StrictModel):
    """Fraction of the pool given each planted defect; the rest are clean scenes."""

    exact_duplicate: float = Field(0.04, ge=0, le=1)
    near_duplicate: float = Field(0.06, ge=0, le=1)
    mismatched_caption: float = Field(0.08, ge=0, le=1)
    low_quality: float = Field(0.06, ge=0, le=1)
    tiny: float = Field(0.02, ge=0, le=1)
    unsafe: float = Field(0.04, ge=0, le=1)
    bad_caption: float = Field(0.03, ge=0, le=1)
    broken_url: float = Field(0.03, ge=0, le=1)
    corrupt_file: float = Field(0.03, ge=0, le=1)
    eval_leak: float = Field(0.02, ge=0, le=1)
    slow: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_below_one(self) -> DefectFractions:
        total = sum(self.model_dump().values())
        if total > 0.9:
            raise ValueError(f"defect fractions add up to {total:.2f}; keep them at or below 0.9")
        return self


class DemoPoolConfig(StrictModel):
    n_samples: int = Field(1000, gt=0)
    n_eval: int = Field(300, gt=0)
    image_size: int = Field(64, ge=16, le=1024)
    tiny_size: int = Field(10, ge=1)
    seed: int = 0
    port: int = Field(0, ge=0, le=65535, description="loopback port; 0 picks a free one")
    slow_seconds: float = Field(0.0, ge=0, description="delay the server adds to 'slow' URLs")
    labelled_fraction: float = Field(
        0.3, ge=0, lt=1, description="rows given human-style labels (ratings, unsafe, good pair) for fitting filters"
    )
    defects: DefectFractions = DefectFractions()


@dataclass
class PoolRow:
    url: str
    caption: str
    label: str | None
    defect: str
    detail: str = ""
    duplicate_of: str | None = None
    unsafe: bool = False
    expected: str = "kept"
    labelled: bool = False

    @property
    def uid(self) -> str:
        return compute_uid(self.url, self.caption)


class _PoolWriter:
    """Writes image bytes under files/ and remembers the rows that point at them."""

    def __init__(self, files_dir: Path, base_url: str):
        self.files_dir = files_dir
        self.base_url = base_url.rstrip("/")
        self.rows: list[PoolRow] = []

    def add(self, name: str, payload: bytes, row: PoolRow, route: str = "") -> PoolRow:
        write_bytes(self.files_dir / name, payload)
        row.url = f"{self.base_url}/{route}{name}"
        self.rows.append(row)
        return row


def _defect_counts(config: DemoPoolConfig) -> dict[str, int]:
    return {k: int(round(v * config.n_samples)) for k, v in config.defects.model_dump().items()}


def _eval_set(config: DemoPoolConfig, eval_dir: Path, rng: np.random.Generator) -> list[tuple[str, bytes, world.Scene]]:
    """Write the held-out set as one webdataset tar plus a labels table; return its images."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    names = world.class_names()
    items, records = [], []
    with atomic_path(eval_dir / "00000.tar") as tmp, tarfile.open(tmp, "w") as tar:
        for i in range(config.n_eval):
            scene = world.random_scene(rng)
            payload = world.encode_jpeg(world.render_scene(scene, config.image_size, rng))
            uid = compute_uid(f"eval://{i}", scene.caption)
            label_index = names.index(scene.label)
            for ext, data in (("jpg", payload), ("txt", scene.caption.encode()), ("cls", str(label_index).encode())):
                info = tarfile.TarInfo(f"{uid}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, BytesIO(data))
            items.append((uid, payload, scene))
            records.append({"uid": uid, "label": scene.label, "label_index": label_index, "caption": scene.caption})
    write_parquet(eval_dir / "labels.parquet", pa.Table.from_pylist(records))
    write_json(eval_dir / "classnames.json", names, indent=0)
    return items


def generate_pool(config: DemoPoolConfig, pool_dir: Path, base_url: str) -> Manifest:
    """Write files/, source.parquet, ground_truth.parquet and eval/ under `pool_dir`."""
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    files_dir = pool_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    eval_items = _eval_set(config, pool_dir / "eval", np.random.default_rng(config.seed + 1))
    counts = _defect_counts(config)
    n_clean = config.n_samples - sum(counts.values())
    size = config.image_size
    pool = _PoolWriter(files_dir, base_url)

    originals: list[tuple[PoolRow, bytes, world.Scene]] = []
    for i in range(n_clean):
        scene = world.random_scene(rng)
        payload = world.encode_jpeg(world.render_scene(scene, size, rng))
        row = pool.add(f"clean_{i}.jpg", payload, PoolRow("", scene.caption, scene.label, "clean"))
        originals.append((row, payload, scene))

    def pick_original() -> tuple[PoolRow, bytes, world.Scene]:
        return originals[int(rng.integers(len(originals)))]

    for i in range(counts["exact_duplicate"]):
        source, payload, scene = pick_original()
        pool.add(
            f"copy_{i}.jpg",
            payload,
            PoolRow("", source.caption, scene.label, "exact_duplicate", "same bytes", duplicate_of=source.uid),
        )
    for i in range(counts["near_duplicate"]):
        source, payload, scene = pick_original()
        kind, variant = _near_duplicate(payload, i, rng)
        pool.add(
            f"near_{i}.jpg",
            variant,
            PoolRow("", source.caption, scene.label, "near_duplicate", kind, duplicate_of=source.uid),
        )
    for i in range(counts["mismatched_caption"]):
        scene = world.random_scene(rng)
        other = world.random_scene(rng)
        while other.label == scene.label:
            other = world.random_scene(rng)
        payload = world.encode_jpeg(world.render_scene(scene, size, rng))
        pool.add(
            f"mismatch_{i}.jpg",
            payload,
            PoolRow("", other.caption, scene.label, "mismatched_caption", f"image is a {scene.label}"),
        )
    for i in range(counts["low_quality"]):
        scene = world.random_scene(rng)
        image = world.render_scene(scene, size, rng)
        kind = "noise" if i % 2 == 0 else "blur"
        image = world.degrade_noise(image, rng) if kind == "noise" else world.degrade_blur(image)
        # as on the web, some captions admit it; that is how a CLIP's embedding comes to encode quality
        caption = (
            f"a {'grainy' if kind == 'noise' else 'blurry'} photo of {scene.caption}" if i % 4 < 2 else scene.caption
        )
        pool.add(
            f"lowq_{i}.jpg",
            world.encode_jpeg(image, quality=60),
            PoolRow("", caption, scene.label, "low_quality", kind),
        )
    for i in range(counts["tiny"]):
        scene = world.random_scene(rng)
        image = world.render_scene(scene, config.tiny_size, rng)
        pool.add(
            f"tiny_{i}.jpg",
            world.encode_jpeg(image),
            PoolRow("", scene.caption, scene.label, "low_quality", "tiny", expected="dropped:too_small"),
        )
    for i in range(counts["unsafe"]):
        caption = f"a {world.UNSAFE_LABEL} {rng.choice(list(world.POSITIONS))}"
        pool.add(
            f"hazard_{i}.jpg",
            world.encode_jpeg(world.render_hazard(size, rng)),
            PoolRow("", caption, world.UNSAFE_LABEL, "unsafe", unsafe=True),
        )
    for i in range(counts["bad_caption"]):
        scene = world.random_scene(rng)
        kind = ("filename", "too_short", "not_english")[i % 3]
        caption = {
            "filename": f"IMG_{int(rng.integers(1000, 9999))}.jpg",
            "too_short": scene.label,
            "not_english": str(rng.choice(NON_ENGLISH_CAPTIONS)),
        }[kind]
        pool.add(
            f"badcap_{i}.jpg",
            world.encode_jpeg(world.render_scene(scene, size, rng)),
            PoolRow("", caption, scene.label, "bad_caption", kind),
        )
    for i in range(counts["broken_url"]):
        scene = world.random_scene(rng)
        row = PoolRow("", scene.caption, scene.label, "broken_url")
        if i % 2 == 0:
            row.detail, row.expected = "404", "failed:http_404"
            row.url = f"{pool.base_url}/missing_{i}.jpg"
        else:
            row.detail, row.expected = "connection refused", "failed:connection_error"
            row.url = f"{CONNECTION_REFUSED_BASE}/refused_{i}.jpg"
        pool.rows.append(row)
    corrupt_payloads = {
        "random_bytes": lambda: rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
        "truncated_jpeg": lambda: world.encode_jpeg(world.render_scene(world.random_scene(rng), size, rng))[:64],
        "zero_bytes": lambda: b"",
        "html_page": lambda: b"<!doctype html><html><body><h1>Not an image</h1></body></html>",
    }
    kinds = list(corrupt_payloads)
    for i in range(counts["corrupt_file"]):
        kind = kinds[i % len(kinds)]
        scene = world.random_scene(rng)
        pool.add(
            f"corrupt_{i}.jpg",
            corrupt_payloads[kind](),
            PoolRow("", scene.caption, scene.label, "corrupt_file", kind, expected="failed:decode_error"),
        )
    for i in range(counts["eval_leak"]):
        eval_uid, payload, scene = eval_items[i % len(eval_items)]
        kind, variant = _near_duplicate(payload, i, rng)
        pool.add(
            f"leak_{i}.jpg", variant, PoolRow("", scene.caption, scene.label, "eval_leak", kind, duplicate_of=eval_uid)
        )
    for i in range(counts["slow"]):
        scene = world.random_scene(rng)
        payload = world.encode_jpeg(world.render_scene(scene, size, rng))
        pool.add(
            f"slow_{i}.jpg",
            payload,
            PoolRow("", scene.caption, scene.label, "slow", f"{config.slow_seconds}s delay"),
            route="slow/",
        )

    order = rng.permutation(len(pool.rows))
    rows = [pool.rows[i] for i in order]
    for row in rows[: int(round(config.labelled_fraction * len(rows)))]:  # rows are shuffled: a random slice
        row.labelled = True
    _write_tables(rows, pool_dir)
    _write_labels(rows, pool_dir / "labels.parquet", rng)
    write_json(pool_dir / "pool.json", {"base_url": base_url, "n_rows": len(rows), "config": config.model_dump()})
    return Manifest(
        stage="demo_pool",
        **{"in": config.n_samples},
        kept=len(rows),
        outputs=DemoPoolOutputs(
            table=str(pool_dir / "source.parquet"),
            ground_truth=str(pool_dir / "ground_truth.parquet"),
            labels=str(pool_dir / "labels.parquet"),
            eval_dir=str(pool_dir / "eval"),
            files=str(files_dir),
        ).as_dict(),
        seconds=time.perf_counter() - started,
        metrics={f"defect_{k}": float(v) for k, v in count_reasons([r.defect for r in rows]).items()},
    )


def _near_duplicate(payload: bytes, i: int, rng: np.random.Generator) -> tuple[str, bytes]:
    """A resized, re-encoded or slightly cropped copy of an encoded image."""
    from PIL import Image

    image = Image.open(BytesIO(payload)).convert("RGB")
    w, h = image.size
    kind = ("resized", "reencoded", "cropped")[i % 3]
    if kind == "resized":
        scale = float(rng.uniform(0.7, 0.9))
        image = image.resize((max(8, int(w * scale)), max(8, int(h * scale))), Image.BICUBIC)
        return kind, world.encode_jpeg(image, quality=90)
    if kind == "reencoded":
        return kind, world.encode_jpeg(image, quality=int(rng.integers(50, 76)))
    margin = max(1, int(round(w * 0.025)))
    image = image.crop((margin, margin, w - margin, h - margin)).resize((w, h), Image.BICUBIC)
    return kind, world.encode_jpeg(image, quality=90)


RATERS = 3  # each labelled item is rated by three people
RATER_ERROR = 0.1  # the chance one rater gets a yes/no question wrong
RATER_SPREAD = 1.0  # one rater's offset from the item's quality, in rating points (std)


def _write_labels(rows: list[PoolRow], path: Path, rng: np.random.Generator) -> None:
    """What a labelling team would hand over for the labelled slice: three raters per item, who
    disagree as people do, and the table their votes make.

    - `rating` (LAION's 1-10 aesthetic scale): the item's quality (degraded images 1.5-3.5, others
      5.5-8.5) plus each rater's offset (normal, `RATER_SPREAD`), rounded to whole points and
      clipped to 1-10, then averaged; `rating_std` is the raters' spread.
    - `unsafe`, `good_pair`: each rater answers wrongly with probability `RATER_ERROR`; the
      majority decides (about 3% of items flipped); `agreement` is the share of raters who agree
      with the majority, on both questions together.
    The filters are scored against the planted truth (`ground_truth.parquet`), never these labels.
    """
    labelled = [r for r in rows if r.labelled]
    n = len(labelled)
    low = np.array([r.defect == "low_quality" for r in labelled], bool)
    quality = np.where(low, rng.uniform(1.5, 3.5, n), rng.uniform(5.5, 8.5, n))
    votes = np.clip(np.round(quality[:, None] + rng.normal(0, RATER_SPREAD, (n, RATERS))), 1, 10)
    truths = {
        "unsafe": np.array([r.unsafe for r in labelled], bool),
        "good_pair": np.array([r.defect in GOOD_PAIR_DEFECTS for r in labelled], bool),
    }
    answers, agreement = {}, np.zeros(n)
    for name, truth in truths.items():
        said = truth[:, None] ^ (rng.random((n, RATERS)) < RATER_ERROR)
        answers[name] = said.sum(axis=1) * 2 > RATERS
        agreement += (said == answers[name][:, None]).mean(axis=1) / len(truths)
    write_parquet(
        path,
        pa.table(
            {
                "uid": pa.array([r.uid for r in labelled], pa.string()),
                "rating": pa.array(votes.mean(axis=1), pa.float32()),
                "rating_std": pa.array(votes.std(axis=1), pa.float32()),
                "unsafe": pa.array(answers["unsafe"], pa.bool_()),
                "good_pair": pa.array(answers["good_pair"], pa.bool_()),
                "agreement": pa.array(agreement, pa.float32()),
            }
        ),
    )


def _write_tables(rows: list[PoolRow], pool_dir: Path) -> None:
    write_parquet(
        pool_dir / "source.parquet", pa.table({"url": [r.url for r in rows], "caption": [r.caption for r in rows]})
    )
    write_parquet(
        pool_dir / "ground_truth.parquet",
        pa.table(
            {
                "uid": [r.uid for r in rows],
                "url": [r.url for r in rows],
                "caption": [r.caption for r in rows],
                "label": [r.label for r in rows],
                "defect": [r.defect for r in rows],
                "detail": [r.detail for r in rows],
                "duplicate_of": [r.duplicate_of for r in rows],
                "unsafe": [r.unsafe for r in rows],
                "expected": [r.expected for r in rows],
                "labelled": [r.labelled for r in rows],
            }
        ),
    )


class DemoPoolOutputs(SourceOutputs):
    """The demo is a source that also knows the truth: every planted defect, by uid."""

    table: str = Field(validation_alias=AliasChoices("table", "source"))  # `source`: runs before 2026-11-25
    eval_dir: str | None = Field(None, validation_alias=AliasChoices("eval_dir", "eval"))
    ground_truth: str
    files: str

    gives_labels = True
    gives_eval_set = True

    def quality(self, outputs: StageOutputs) -> dict[str, float]:
        """Dedupe and filter decisions scored against the planted defects (the labelled slice the
        filters were fitted on is left out of filter scores)."""
        if not isinstance(outputs, DedupeOutputs | FilterOutputs):
            return {}
        truth = pq.read_table(self.ground_truth)
        decisions = read_decisions(outputs.decisions)
        if isinstance(outputs, DedupeOutputs):
            return dedupe_quality(decisions, truth)
        labelled = set(pq.read_table(self.labels, columns=["uid"]).column("uid").to_pylist())
        return filter_quality(decisions, truth, exclude=labelled)


class DemoPool(Stage):
    name = "demo_pool"
    summary = "generate the demo pool, its ground truth and eval set"
    source_kind = "demo"  # recipes select it with `source.kind: demo`; its config is `source.demo`
    config_model = DemoPoolConfig
    Outputs = DemoPoolOutputs

    base_url: str | None = None

    def source_rows(self) -> int:
        return self.config.n_samples

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        where = f"generated (seed {self.config.seed}, {self.config.n_eval} eval images)"
        return PlanRow(self.name, where, str(run_dir / self.name), rows, "served on 127.0.0.1 during the run")

    @contextmanager
    def serving(self, ctx: RunContext) -> Iterator[None]:
        """Serve the pool's files on loopback for the whole run (the same port again on resume:
        URLs, and so uids, embed it)."""
        pool_dir = self.stage_dir(ctx)
        files_dir = pool_dir / "files"
        files_dir.mkdir(parents=True, exist_ok=True)
        port = self.config.port
        record = pool_dir / "pool.json"
        if record.exists():
            port = int(json.loads(record.read_text())["base_url"].rsplit(":", 1)[1])
        with serve_directory(files_dir, port, self.config.slow_seconds) as base_url:
            self.base_url = base_url
            yield

    def run(self, ctx: RunContext, inputs: object) -> tuple[DemoPoolOutputs, Manifest]:
        if self.base_url is None:
            raise RuntimeError("the demo pool server is not running")
        manifest = generate_pool(self.config, self.stage_dir(ctx), self.base_url)
        return self.finished(manifest)
