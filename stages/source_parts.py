"""Url tables into download parts with Ray tasks: the driver never holds the table.

1. The table is cut into chunks: one per file, parquet files by row groups (up to
   `ROWS_PER_CHUNK` rows a chunk). The driver reads file names and parquet footers only.
2. One task per chunk reads it, checks it, normalises it (uid, url, caption, then the metadata
   columns; a table's own uid kept, else derived) and writes it as arrow, with its uids also
   written into hash buckets.
3. One task per bucket (at most 4,096) finds the rows whose uid an earlier row already had (earlier in the input
   order: chunk, then row) and writes their row numbers per chunk. Identical url+caption rows are one
   sample: the first is kept, the others are dropped as `duplicate_row`.
4. The driver plans the parts from per-chunk counts: each part is a few (chunk, start, stop) pieces
   of the kept rows, in input order, so the parts hold the same rows as cutting the whole table would.
   Each download task builds its own part from its pieces.

Scale: the driver holds a row per chunk, per bucket and per part; a read task holds one chunk, a
bucket task the uids of its bucket (about rows / 4,096: ~3M at DataComp xlarge), a download task
its own part. Each bucket task opens every chunk's uid file (one per chunk, sorted by bucket).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.mapping import MapFn, local_map
from stages.metadata_schema import MetadataSchema, SchemaName, resolve
from stages.shards import cut_in_order
from stages.source_table import (
    SourceTableError,
    detect_format,
    expand_table_paths,
    first_file_columns,
    normalise_table,
    read_table,
    unreadable,
)

ROWS_PER_CHUNK = 1_000_000  # rows one task reads and normalises at once
MAX_BUCKETS = 4096  # a bucket task holds about rows / buckets uids: ~3M at DataComp xlarge
# the tasks' names in the dashboard; their progress files go under `<run>/download/source/`, the work dir
READ_TASKS, DUPLICATE_TASKS = "download/source/read", "download/source/duplicates"


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str
    row_groups: tuple[int, ...] | None = None  # a parquet file's row groups; None: the whole file


@dataclass(frozen=True)
class SourceSpec:
    """How to read the table's columns (resolved once, from its first file), and where tasks write."""

    layout: MetadataSchema
    work_dir: str
    n_buckets: int


@dataclass(frozen=True)
class ChunkResult:
    index: int
    rows: int
    schema: pa.Schema | None
    error: str | None = None


@dataclass(frozen=True)
class Piece:
    """Kept rows `start:stop` of one chunk (rows a duplicate dropped do not count)."""

    chunk: int
    start: int
    stop: int


def _parquet_chunks(path: str, rows_per_chunk: int) -> list[tuple[int, ...]]:
    """Consecutive row groups of a parquet file, grouped up to `rows_per_chunk` rows (from its footer)."""
    try:
        with fsspec.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as err:
        raise unreadable(path, err) from err
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    rows = 0
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        if current and rows + n > rows_per_chunk:
            groups.append(tuple(current))
            current, rows = [], 0
        current.append(group)
        rows += n
    return [*groups, tuple(current)] if current else groups


def source_chunks(path: str, rows_per_chunk: int = ROWS_PER_CHUNK) -> list[Chunk]:
    """The chunks of a table (a file, a folder of tables or a glob), in input order."""
    chunks: list[Chunk] = []
    for file in expand_table_paths(path):
        if detect_format(file) == "parquet":
            for groups in _parquet_chunks(file, rows_per_chunk) or [None]:
                chunks.append(Chunk(len(chunks), file, groups))
        else:
            chunks.append(Chunk(len(chunks), file))
    return chunks


def read_chunk(chunk: Chunk) -> pa.Table:
    if chunk.row_groups is None:
        return read_table(chunk.path)
    try:
        with fsspec.open(chunk.path, "rb") as f:
            return pq.ParquetFile(f).read_row_groups(list(chunk.row_groups))
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as err:
        raise unreadable(chunk.path, err) from err


def uid_buckets(uids: list[str], n_buckets: int) -> np.ndarray:
    """A bucket per uid from a hash of it (a table's own uids may be any plain name)."""
    digests = (hashlib.md5(u.encode(), usedforsecurity=False).digest()[:4] for u in uids)
    return np.fromiter((int.from_bytes(d, "little") % n_buckets for d in digests), np.int64, len(uids))


def write_arrow(table: pa.Table, path: Path) -> None:
    """An arrow IPC file, atomically (img2dataset reads a part's input in this format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _rows_file(work_dir: str | Path, chunk: int) -> Path:
    return Path(work_dir) / "rows" / f"{chunk:07d}.arrow"


def _uids_file(work_dir: str | Path, chunk: int) -> Path:
    return Path(work_dir) / "uids" / f"{chunk:07d}.arrow"


def normalised_chunk(chunk: Chunk, layout: MetadataSchema) -> pa.Table:
    """One chunk read, checked and normalised; SourceTableError (one line) when it cannot be used."""
    raw = read_chunk(chunk)
    if layout.uid and layout.uid not in raw.column_names:
        raise SourceTableError(f"{chunk.path}: missing column '{layout.uid}' (the first table has its uids)")
    try:
        return normalise_table(raw, layout, chunk.path)
    except SourceTableError:
        raise
    except ValueError as err:
        raise SourceTableError(f"{chunk.path}: {err}") from None


def normalise_chunk(chunk: Chunk, spec: SourceSpec) -> ChunkResult:
    """Read, check and normalise one chunk; write it, and its (uid, row) sorted by bucket with the
    buckets' offsets. A table that cannot be used comes back as the one-line error, not raised: a
    retry would not mend it."""
    try:
        table = normalised_chunk(chunk, spec.layout)
    except SourceTableError as err:
        return ChunkResult(chunk.index, 0, None, str(err))
    write_arrow(table, _rows_file(spec.work_dir, chunk.index))
    uids = table.column("uid")
    buckets = uid_buckets(uids.to_pylist(), spec.n_buckets)
    order = np.argsort(buckets, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(buckets, minlength=spec.n_buckets))])
    by_bucket = pa.table({"uid": uids.take(pa.array(order)), "row": order.astype(np.int64)})
    by_bucket = by_bucket.replace_schema_metadata({"offsets": ",".join(map(str, offsets.tolist()))})
    write_arrow(by_bucket, _uids_file(spec.work_dir, chunk.index))
    return ChunkResult(chunk.index, table.num_rows, table.schema)


def find_duplicate_rows(bucket: int, spec: SourceSpec) -> dict[int, int]:
    """Rows of this bucket whose uid an earlier row (chunk, then row) had: written per chunk; counts back."""
    tables = []
    for file in sorted((Path(spec.work_dir) / "uids").glob("*.arrow")):
        table = _read_arrow(file)
        offsets = [int(x) for x in table.schema.metadata[b"offsets"].split(b",")]
        part = table.slice(offsets[bucket], offsets[bucket + 1] - offsets[bucket])
        tables.append(part.append_column("chunk", pa.array(np.full(part.num_rows, int(file.stem), np.int64))))
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows < 2:
        return {}
    table = table.take(pc.sort_indices(table, [("uid", "ascending"), ("chunk", "ascending"), ("row", "ascending")]))
    uids = table.column("uid")
    repeated = np.zeros(table.num_rows, bool)
    repeated[1:] = pc.equal(uids.slice(1), uids.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    chunks, rows = table.column("chunk").to_numpy()[repeated], table.column("row").to_numpy()[repeated]
    counts: dict[int, int] = {}
    for chunk in np.unique(chunks):
        mine = np.sort(rows[chunks == chunk])
        path = Path(spec.work_dir) / "drops" / f"{chunk:07d}" / f"{bucket:04d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, mine)
        counts[int(chunk)] = len(mine)
    return counts


def _kept_indices(work_dir: str | Path, chunk: int, n_rows: int) -> np.ndarray:
    """The rows of a chunk that no duplicate finding dropped, in order."""
    drops = [np.load(p) for p in sorted((Path(work_dir) / "drops" / f"{chunk:07d}").glob("*.npy"))]
    if not drops:
        return np.arange(n_rows)
    keep = np.ones(n_rows, bool)
    keep[np.concatenate(drops)] = False
    return np.flatnonzero(keep)


def piece_rows(work_dir: str | Path, pieces: tuple[Piece, ...], columns: tuple[str, ...]) -> pa.Table:
    """One part's rows, every column present (nulls where a chunk lacked one), in `columns`' order.
    Only the part's own rows are taken from each (memory-mapped) chunk."""
    tables = []
    for p in pieces:
        chunk = _read_arrow(_rows_file(work_dir, p.chunk))
        tables.append(chunk.take(pa.array(_kept_indices(work_dir, p.chunk, chunk.num_rows)[p.start : p.stop])))
    table = pa.concat_tables(tables, promote_options="default")
    for name in columns:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table.select(list(columns))


def plan_pieces(kept_per_chunk: list[int], rows_per_part: int) -> list[tuple[Piece, ...]]:
    """Cut the kept rows, chunk after chunk, into parts of `rows_per_part`."""
    return [tuple(Piece(*piece) for piece in group) for group in cut_in_order(kept_per_chunk, rows_per_part)]


@dataclass(frozen=True)
class SourcePlan:
    n_in: int
    duplicate_rows: int
    parts: list[tuple[Piece, ...]]
    columns: tuple[str, ...]  # uid, url, caption, then every metadata column any chunk carried
    work_dir: str


def _unified_columns(path: str, results: list[ChunkResult]) -> tuple[str, ...]:
    try:
        schema = pa.unify_schemas([r.schema for r in results if r.schema is not None], promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise SourceTableError(f"{path}: tables do not share a schema: {str(err).splitlines()[0]}") from err
    return tuple(schema.names)


def plan_source(
    path: str,
    schema: SchemaName,
    url_col: str | None,
    caption_col: str | None,
    work_dir: Path,
    rows_per_part: int,
    map_fn: MapFn = local_map,
    rows_per_chunk: int = ROWS_PER_CHUNK,
) -> SourcePlan:
    """Read the table as chunks in tasks, drop duplicate rows in bucket tasks, and plan the parts.
    A table that cannot be used raises SourceTableError (one line) and leaves `work_dir` removed."""
    shutil.rmtree(work_dir, ignore_errors=True)  # a killed run's chunks, buckets and drops: made anew
    try:
        chunks = source_chunks(path, rows_per_chunk)
        try:
            layout = resolve(first_file_columns(path), schema, url_col, caption_col)
        except ValueError as err:
            raise (err if isinstance(err, SourceTableError) else SourceTableError(f"{path}: {err}")) from None
        spec = SourceSpec(layout, str(work_dir), min(MAX_BUCKETS, max(1, len(chunks))))

        def read_table_chunk(chunk: Chunk) -> ChunkResult:  # named: Ray's dashboard shows tasks by function name
            return normalise_chunk(chunk, spec)

        def find_duplicates(bucket: int) -> dict[int, int]:
            return find_duplicate_rows(bucket, spec)

        results = map_fn(read_table_chunk, chunks, desc=READ_TASKS, weight=lambda r: r.rows)
        error = next((r.error for r in results if r.error), None)
        if error:
            raise SourceTableError(error)
        if sum(r.rows for r in results) == 0:
            raise SourceTableError(f"{path}: the table has no rows")
        columns = _unified_columns(path, results)
        drops = map_fn(find_duplicates, list(range(spec.n_buckets)), desc=DUPLICATE_TASKS)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    dropped = [0] * len(chunks)
    for counts in drops:
        for chunk, n in counts.items():
            dropped[chunk] += n
    kept = [r.rows - d for r, d in zip(results, dropped, strict=True)]
    parts = plan_pieces(kept, rows_per_part)
    return SourcePlan(sum(r.rows for r in results), sum(dropped), parts, columns, str(work_dir))
