"""The per-uid table filters run on: one row per downloaded sample, one column per score.

It joins what earlier stages wrote, all keyed by uid: captions and original sizes from the
download parquets, pHash from the hash tables, dedupe decisions, and the embed stage's
embeddings and scores. Rows are aligned by position (`pc.index_in` + `take`) rather than a
hash join, because Arrow's join cannot carry the embeddings' fixed-size-list columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.dedupe import POOL_COLUMNS as DEDUPE_COLUMNS
from stages.download import downloaded_rows
from stages.phash import POOL_COLUMNS as PHASH_COLUMNS
from stages.phash import SCHEMA as PHASH_SCHEMA


def attach(base: pa.Table, other: pa.Table, columns: dict[str, str]) -> pa.Table:
    """Add `other`'s columns (renamed old -> new) to `base`, matched by uid; missing uids get nulls."""
    index = pc.index_in(base.column("uid"), value_set=other.column("uid"))
    for old, new in columns.items():
        base = base.append_column(new, other.column(old).take(index))
    return base


@dataclass(frozen=True)
class PoolSources:
    """Where the per-uid rows come from: each earlier stage's files, one per shard, by shard stem."""

    shards_dir: str
    hashes_dir: str | None = None
    dedupe_decisions: str | None = None  # per-shard decisions folder; older runs: one file, read whole per shard
    embeddings_dir: str | None = None
    table_parts: bool = False  # shards_dir holds parts of a source table (the prefilter's pool), not downloads

    def stems(self) -> list[str]:
        return [p.stem for p in sorted(Path(self.shards_dir).glob("*.parquet"))]


def build_pool_table(
    shards_dir: Path,
    hashes_dir: Path | None = None,
    decisions_path: Path | None = None,
    embeddings_dir: Path | None = None,
) -> pa.Table:
    """The whole pool's table, shard after shard (what the filter stage never builds: it reads
    `shard_pool_table` per shard; tests use this as the one-table oracle)."""
    sources = PoolSources(
        *(str(p) if p is not None else None for p in (shards_dir, hashes_dir, decisions_path, embeddings_dir))
    )
    tables = [shard_pool_table(sources, stem) for stem in sources.stems()]
    if not tables:
        return shard_pool_table(sources, None)
    return pa.concat_tables(tables, promote_options="default")


def shard_pool_table(sources: PoolSources, stem: str | None, embed_columns: list[str] | None = None) -> pa.Table:
    """One shard's per-uid table; `embed_columns` limits what is read of its embeddings (default all).
    stem None: the empty table with every column."""
    if sources.table_parts:
        return metadata_pool(pq.read_table(Path(sources.shards_dir) / f"{stem}.parquet"))
    table = downloaded_rows(Path(sources.shards_dir), [stem] if stem else [])
    if sources.hashes_dir is not None:
        hashes = _shard_file(Path(sources.hashes_dir), stem, schema=PHASH_SCHEMA)
        table = _missing_as(attach(table, hashes, PHASH_COLUMNS), hashes, "phash_reason", "not_hashed")
    if sources.dedupe_decisions is not None:
        decisions = Path(sources.dedupe_decisions)
        columns = ["uid", "keep", "reason"]
        verdicts = (
            _shard_file(decisions, stem, columns) if decisions.is_dir() else pq.read_table(decisions, columns=columns)
        )
        table = attach(table, verdicts, DEDUPE_COLUMNS)
    if sources.embeddings_dir is not None:
        wanted = None if embed_columns is None else ["uid", "reason", *embed_columns]
        embedded = _shard_file(Path(sources.embeddings_dir), stem, wanted)
        scores = [c for c in embedded.column_names if c not in ("uid", "reason")]
        table = attach(table, embedded, {**{c: c for c in scores}, "reason": "embed_reason"})
        table = _missing_as(table, embedded, "embed_reason", "not_embedded")
    return table


METADATA_SIZES = {"source_width": "original_width", "source_height": "original_height"}  # for `basic`


def metadata_pool(table: pa.Table) -> pa.Table:
    """A normalised source table as a filter's pool: the metadata's sizes stand in for the
    downloaded image's until there is one (so `basic`'s size rules apply before download)."""
    for claimed, measured in METADATA_SIZES.items():
        if claimed in table.column_names and measured not in table.column_names:
            table = table.append_column(measured, table.column(claimed))
    return table


def _shard_file(
    folder: Path, stem: str | None, columns: list[str] | None = None, schema: pa.Schema | None = None
) -> pa.Table:
    """One shard's table of an earlier stage; a shard it wrote nothing for reads as an empty table
    of the folder's schema, so every shard's pool table has the same columns."""
    path = folder / f"{stem}.parquet"
    if stem is not None and path.exists():
        if columns is not None:
            names = pq.read_schema(path).names
            columns = [c for c in columns if c in names]  # a score column may come from the download
        return pq.read_table(path, columns=columns, schema=schema)
    if schema is None:
        any_file = next(iter(sorted(folder.glob("*.parquet"))), None)
        if any_file is None:
            return pa.table({"uid": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
        schema = pq.read_schema(any_file)
    names = columns or schema.names
    return pa.schema([schema.field(n) for n in names if n in schema.names]).empty_table()


def _missing_as(table: pa.Table, written: pa.Table, reason_column: str, reason: str) -> pa.Table:
    """Rows the upstream stage never wrote (uid not in its table) get an explicit reason."""
    absent = pc.invert(pc.is_in(table.column("uid"), value_set=written.column("uid")))
    filled = pc.if_else(absent, pa.scalar(reason), table.column(reason_column))
    return table.set_column(table.column_names.index(reason_column), reason_column, filled)


def upstream_failure(table: pa.Table) -> list[str | None]:
    """Per row, the first reason an earlier stage could not process the sample (None if none)."""
    per_column = [table.column(c).to_pylist() for c in ("phash_reason", "embed_reason") if c in table.column_names]
    return [next((r for r in reasons if r), None) for reasons in zip(*per_column, strict=True)] or [
        None
    ] * table.num_rows
