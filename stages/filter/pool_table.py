"""The per-uid table filters run on: one row per downloaded sample, one column per score.

It joins what earlier stages wrote, all keyed by uid: captions and original sizes from the
download parquets, pHash from the hash tables, dedupe decisions, and the embed stage's
embeddings and scores. Rows are aligned by position (`pc.index_in` + `take`) rather than a
hash join, because Arrow's join cannot carry the embeddings' fixed-size-list columns.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.dedupe import POOL_COLUMNS as DEDUPE_COLUMNS
from stages.download import downloaded_rows
from stages.embed import read_embedding_tables
from stages.phash import POOL_COLUMNS as PHASH_COLUMNS
from stages.phash import read_hash_tables


def attach(base: pa.Table, other: pa.Table, columns: dict[str, str]) -> pa.Table:
    """Add `other`'s columns (renamed old -> new) to `base`, matched by uid; missing uids get nulls."""
    index = pc.index_in(base.column("uid"), value_set=other.column("uid"))
    for old, new in columns.items():
        base = base.append_column(new, other.column(old).take(index))
    return base


def build_pool_table(
    shards_dir: Path,
    hashes_dir: Path | None = None,
    decisions_path: Path | None = None,
    embeddings_dir: Path | None = None,
) -> pa.Table:
    table = downloaded_rows(shards_dir)
    if hashes_dir is not None:
        hashes = read_hash_tables(hashes_dir, only_hashed=False)
        table = attach(table, hashes, PHASH_COLUMNS)
        table = _missing_as(table, "phash_reason", "phash", "not_hashed")
    if decisions_path is not None:
        decisions = pq.read_table(decisions_path, columns=["uid", "keep", "reason"])
        table = attach(table, decisions, DEDUPE_COLUMNS)
    if embeddings_dir is not None:
        embedded = read_embedding_tables(embeddings_dir)
        scores = [c for c in embedded.column_names if c not in ("uid", "reason")]
        table = attach(table, embedded, {**{c: c for c in scores}, "reason": "embed_reason"})
        table = _missing_as(table, "embed_reason", "image_emb", "not_embedded")
    return table


def _missing_as(table: pa.Table, reason_column: str, value_column: str, reason: str) -> pa.Table:
    """Rows the upstream stage never wrote (no value, no reason) get an explicit reason."""
    reasons = table.column(reason_column)
    absent = pc.and_(pc.is_null(reasons), pc.is_null(table.column(value_column)))
    filled = pc.if_else(absent, pa.scalar(reason), reasons)
    return table.set_column(table.column_names.index(reason_column), reason_column, filled)


def upstream_failure(table: pa.Table) -> list[str | None]:
    """Per row, the first reason an earlier stage could not process the sample (None if none)."""
    per_column = [table.column(c).to_pylist() for c in ("phash_reason", "embed_reason") if c in table.column_names]
    return [next((r for r in reasons if r), None) for reasons in zip(*per_column, strict=True)] or [
        None
    ] * table.num_rows
