"""phash stage: a pHash for every downloaded image, one parquet per shard, bit-identical to imagehash.

imagehash converts each image to grey, resizes it to 32x32 with LANCZOS, takes a 2-D DCT,
and compares the 8x8 low frequencies with their median. The PIL steps stay per image (that is
what makes the bits identical); the DCTs and medians run once over the whole batch, and only
the 8 low-frequency rows go through the second DCT pass. Hashes are 64-bit integers whose bit
order matches imagehash's hex string (first coefficient = most significant bit).

Each shard is one task. Its input samples are the successful rows of the download parquet;
each ends up hashed, or failed as `decode_error` (bytes that do not decode) or `missing_in_tar`
(a truncated or incomplete tar). A shard's table is written atomically, so a rerun skips it.

Each task clocks its phases (reading the tar and its parquet, decoding, hashing, writing), and the
manifest sums them over tasks (`task_seconds_<phase>`): decoding is the floor a bit-identical
pHash cannot go under, so the other phases and the time outside tasks are what there is to win.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.fftpack
from PIL import Image
from pydantic import Field

from filters.hamming import to_signed
from pipeline.atomic import write_parquet
from pipeline.manifest import Manifest, count_reasons, merge_reasons
from pipeline.mapping import MapFn, local_map
from pipeline.models import StrictModel
from pipeline.stage import PlanRow, RunContext, Stage, StageOutputs
from stages.download import Download, DownloadOutputs
from stages.shards import expected_samples, image_bytes, read_parquet_folder, read_tar_samples

HASH_SIZE = 8
IMAGE_SIZE = HASH_SIZE * 4  # imagehash's highfreq_factor of 4
_BIT_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def grey_thumbnail(image: Image.Image) -> np.ndarray:
    """The 32x32 grey pixels imagehash hashes."""
    return np.asarray(grey_image(image))


def grey_image(image: Image.Image) -> Image.Image:
    return image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def stack_thumbnails(thumbnails: list[Image.Image]) -> np.ndarray:
    """(n, 32, 32) uint8 from 32x32 grey images, pasted into one sheet and read out once: reading
    each small image on its own (`np.asarray`) costs about a tenth of decoding it."""
    sheet = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE * len(thumbnails)))
    for i, thumbnail in enumerate(thumbnails):
        sheet.paste(thumbnail, (0, IMAGE_SIZE * i))
    return np.frombuffer(sheet.tobytes(), np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def phash_pixels(thumbnails: np.ndarray) -> np.ndarray:
    """pHash of a (n, 32, 32) uint8 stack, as uint64."""
    if len(thumbnails) == 0:
        return np.zeros(0, dtype=np.uint64)
    rows = scipy.fftpack.dct(thumbnails, axis=1)[:, :HASH_SIZE, :]
    low = scipy.fftpack.dct(rows, axis=2)[:, :, :HASH_SIZE].reshape(len(thumbnails), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def phash_images(images: Iterable[Image.Image]) -> np.ndarray:
    return phash_pixels(stack_thumbnails([grey_image(im) for im in images]))


def decode_thumbnail(payload: bytes) -> tuple[np.ndarray, int, int]:
    """Decode image bytes into (32x32 grey pixels, width, height); raises on undecodable bytes."""
    thumbnail, width, height = decode_grey(payload)
    return np.asarray(thumbnail), width, height


def decode_grey(payload: bytes) -> tuple[Image.Image, int, int]:
    """Decode image bytes into (32x32 grey image, width, height); raises on undecodable bytes."""
    with Image.open(BytesIO(payload)) as image:
        image.load()
        return grey_image(image), image.width, image.height


def to_hex(value: int | np.integer) -> str:
    """imagehash's string form of a hash (`str(imagehash.phash(img))`)."""
    return f"{int(value) & 0xFFFFFFFFFFFFFFFF:016x}"


SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("phash", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("reason", pa.string()),
    ]
)


class HashConfig(StrictModel):
    shard_glob: str = Field("*.tar", description="which tars of the shards folder to hash")


@dataclass(frozen=True)
class HashTask:
    tar: str
    output: str


PHASES = ("read", "decode", "hash", "write")


@dataclass
class HashResult:
    n_in: int
    kept: int
    failed: dict[str, int]
    skipped: bool
    phase_seconds: dict[str, float] = field(default_factory=dict)


class PhaseClock:
    """Seconds spent per phase of one task, from `time.perf_counter` (two calls a sample: ~0.1 µs
    against a decode of ~400 µs)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """The time since the last lap goes to `phase`."""
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def timed(self, items: Iterable, phase: str) -> Iterator:
        """`items`, with the time spent producing each charged to `phase`."""
        for item in items:
            self.lap(phase)
            yield item
        self.lap(phase)


def hash_shard(task: HashTask) -> HashResult:
    output = Path(task.output)
    if output.exists():
        return _summarize(pq.read_table(output, columns=["reason"]), skipped=True)
    clock = PhaseClock()
    expected = expected_samples(Path(task.tar))
    position = {uid: i for i, uid in enumerate(expected.column("uid").to_pylist())}
    thumbs, sizes = {}, {}
    reasons: dict[str, str] = {}
    for key, sample in clock.timed(read_tar_samples(task.tar), "read"):
        if key not in position or key in thumbs or key in reasons:
            continue
        payload = image_bytes(sample)
        try:
            if payload is None:
                raise ValueError("no image in sample")
            thumbs[key], *sizes[key] = decode_grey(payload)
        except Exception:  # noqa: BLE001 - any undecodable payload is this sample's failure, not the shard's
            reasons[key] = "decode_error"
        clock.lap("decode")
    hashed_uids = list(thumbs)
    hashes = phash_pixels(stack_thumbnails([thumbs[u] for u in hashed_uids]))
    hash_of = dict(zip(hashed_uids, to_signed(hashes).tolist(), strict=True))
    clock.lap("hash")
    uids = expected.column("uid").to_pylist()
    table = pa.table(
        {
            "uid": uids,
            "phash": [hash_of.get(u) for u in uids],
            "width": [sizes[u][0] if u in sizes else None for u in uids],
            "height": [sizes[u][1] if u in sizes else None for u in uids],
            "original_width": expected.column("original_width").cast(pa.int32()),
            "original_height": expected.column("original_height").cast(pa.int32()),
            "reason": [None if u in hash_of else reasons.get(u, "missing_in_tar") for u in uids],
        },
        schema=SCHEMA,
    )
    write_parquet(output, table)
    result = _summarize(table, skipped=False)
    clock.lap("write")
    return replace(result, phase_seconds=clock.seconds)


def _summarize(table: pa.Table, skipped: bool) -> HashResult:
    reasons = [r for r in table.column("reason").to_pylist() if r is not None]
    return HashResult(table.num_rows, table.num_rows - len(reasons), count_reasons(reasons), skipped)


def run_hash(shards_dir: Path, config: HashConfig, stage_dir: Path, map_fn: MapFn = local_map) -> Manifest:
    """pHash every image of `shards_dir`; tables go to `stage_dir/hashes/<shard>.parquet`."""
    started = time.perf_counter()
    out_dir = stage_dir / "hashes"
    out_dir.mkdir(parents=True, exist_ok=True)
    tars = sorted(Path(shards_dir).glob(config.shard_glob))
    tasks = [HashTask(str(t), str(out_dir / f"{t.stem}.parquet")) for t in tars]
    results = map_fn(hash_shard, tasks, desc="phash", weight=lambda r: r.n_in)
    n_in = sum(r.n_in for r in results)
    seconds = time.perf_counter() - started
    return Manifest(
        stage="phash",
        **{"in": n_in},
        kept=sum(r.kept for r in results),
        failed=merge_reasons(*(r.failed for r in results)),
        outputs=PhashOutputs(hashes_dir=str(out_dir), n_shards=str(len(tasks))).as_dict(),
        seconds=seconds,
        metrics={
            "samples_per_second": n_in / seconds if seconds else 0.0,
            "shards_skipped": float(sum(r.skipped for r in results)),
            **{f"task_seconds_{phase}": sum(r.phase_seconds.get(phase, 0.0) for r in results) for phase in PHASES},
        },
    )


def read_hash_tables(hashes_dir: Path, only_hashed: bool = True, with_shard: bool = False) -> pa.Table:
    """All successfully hashed rows (every row, with `only_hashed=False`), in shard order;
    `with_shard` adds `shard`, each row's index in the sorted list of hash files."""
    table = read_parquet_folder(hashes_dir, schema=SCHEMA, with_shard=with_shard)
    if table is None:
        empty = SCHEMA.empty_table()
        return empty.append_column("shard", pa.array([], pa.int32())) if with_shard else empty
    if not only_hashed:
        return table
    return table.filter(pc.is_valid(table.column("phash")))


POOL_COLUMNS = {"phash": "phash", "reason": "phash_reason"}  # hash table column -> per-uid table column


class PhashOutputs(StageOutputs):
    hashes_dir: str  # one parquet per shard: uid, phash (int64 bits), sizes, reason
    n_shards: str | None = None


@dataclass
class PhashInputs:
    shards: DownloadOutputs


class Phash(Stage):
    name = "phash"
    summary = "perceptual hash of every image, batched, one Ray task per shard"
    config_model = HashConfig
    Inputs = PhashInputs
    Outputs = PhashOutputs
    counts_from = "shards"

    def columns(self, before: list[Stage]) -> tuple[str, ...]:
        return tuple(POOL_COLUMNS.values())

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        output = str(run_dir / self.name / "hashes")
        note = "64-bit pHash per image, imagehash-compatible"
        return PlanRow(self.name, str(run_dir / Download.name / "shards"), output, rows, note, "1 CPU per shard task")

    def run(self, ctx: RunContext, inputs: PhashInputs) -> tuple[PhashOutputs, Manifest]:
        manifest = run_hash(Path(inputs.shards.shards_dir), self.config, self.stage_dir(ctx), map_fn=ctx.map_fn)
        return self.finished(manifest)
