"""Which samples of a pool's shards a set of decisions keeps: one small parquet of kept uids per shard.

Both readers of decisions go through this: the subset stage, which copies the kept samples into new
shards, and the train stage's kept-uid mask, which skips the others as the pool's shards stream by.
Each shard's file lists its kept uids in the order of the shard's table, which is the order of its
tar (img2dataset's writer appends to both together).

Accounting: every sample of the shards' tables is kept, dropped under its decision's reason (per-uid
dedupe reasons folded into their kind), or dropped under `undecided` when no decision covers it.
Scale: with decisions written per shard (dedupe's and filter's), the join runs shard by shard and
one process holds one shard's uid, keep and reason columns at a time; with one decisions file (the
prefilter's, older runs) it holds the pool's three columns (vectorised joins, no per-row Python).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.phash_dedupe import DUPLICATE, EVAL_DUPLICATE
from pipeline.atomic import write_parquet
from stages.shards import NO_DECISIONS, only_successes, read_decisions

MASK_DIR = "kept"  # the folder of per-shard kept-uid files, in the stage folder that writes them
UNDECIDED = "not_hashed"  # downloaded samples no decision covers: the phash stage could not decode them


@dataclass(frozen=True)
class KeptMask:
    """The shards that keep at least one sample, how many each keeps, and where their uids are."""

    shards: list[str]
    kept_per_shard: list[int]
    folder: str
    in_count: int
    dropped: dict[str, int]

    @property
    def kept(self) -> int:
        return sum(self.kept_per_shard)


def mask_file(folder: str | Path, shard: str | Path) -> Path:
    return Path(folder) / f"{Path(shard).stem}.parquet"


def shard_rows(shards: list[str]) -> pa.Table:
    """(uid, shard index, row within the shard) of every successful row of the shards' tables."""
    tables = []
    for index, shard in enumerate(shards):
        path = Path(shard).with_suffix(".parquet")
        columns = [c for c in ("uid", "status") if c in pq.read_schema(path).names]  # not captions, urls, ...
        rows = only_successes(pq.read_table(path, columns=columns))
        n = rows.num_rows
        tables.append(
            pa.table(
                {"uid": rows.column("uid"), "shard": np.full(n, index, np.int32), "row": np.arange(n, dtype=np.int64)}
            )
        )
    if not tables:
        return pa.table(
            {"uid": pa.array([], pa.string()), "shard": pa.array([], pa.int32()), "row": pa.array([], pa.int64())}
        )
    return pa.concat_tables(tables)


def _reason_kinds(reasons: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per-uid dedupe reasons ('duplicate_of:<uid>') folded into their kind, vectorised."""
    for kind in (EVAL_DUPLICATE, DUPLICATE):  # the longer prefix first: it contains the shorter
        reasons = pc.if_else(pc.starts_with(reasons, f"{kind}:"), kind, reasons)
    return reasons


def _reason_counts(reasons: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(reasons)
    return dict(sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)))


def verdicts_keeping(uids: set[str] | frozenset[str]) -> pa.Table:
    """A decisions table that keeps exactly `uids` and says nothing of the rest (they are undecided)."""
    n = len(uids)
    return pa.table(
        {"uid": pa.array(sorted(uids), pa.string()), "keep": np.ones(n, bool), "reason": pa.nulls(n, pa.string())}
    )


def _with_verdicts(rows: pa.Table, decisions: str | Path | pa.Table | None, undecided: str) -> pa.Table:
    """`rows` (uid, shard, row) with each one's keep and reason, in shard and row order; no decisions
    at all keep every row. A null keep is a drop under its reason, as a false one is."""
    n = rows.num_rows
    if decisions is None:
        table = rows.append_column("keep", pa.array(np.ones(n, bool))).append_column("reason", pa.nulls(n, pa.string()))
    else:
        columns = ["uid", "keep", "reason"]
        verdicts = decisions if isinstance(decisions, pa.Table) else read_decisions(decisions, columns)
        verdicts = verdicts.select(columns)
        repeated = verdicts.num_rows - pc.count_distinct(verdicts.column("uid")).as_py()
        if repeated:
            raise ValueError(f"the decisions name {repeated:,} uid(s) more than once: one verdict per uid, please")
        verdicts = verdicts.set_column(2, "reason", verdicts.column("reason").cast(pa.string()))  # all null: type null
        verdicts = verdicts.append_column("decided", pa.array(np.ones(verdicts.num_rows, bool)))
        table = rows.join(verdicts, "uid", join_type="left outer")
        undecided_rows = pc.is_null(table.column("decided"))
        reasons = pc.if_else(undecided_rows, undecided, pc.fill_null(table.column("reason"), "dropped"))
        table = table.set_column(table.column_names.index("keep"), "keep", pc.fill_null(table.column("keep"), False))
        table = table.set_column(table.column_names.index("reason"), "reason", reasons)
    return table.take(pc.sort_indices(table, [("shard", "ascending"), ("row", "ascending")]))


def write_kept_mask(
    shards: list[str], decisions: str | Path | pa.Table | None, folder: Path, undecided: str = UNDECIDED
) -> KeptMask:
    """Join the shards' uids with the decisions; write each shard's kept uids (in table order) under `folder`."""
    stems = [Path(s).stem for s in shards]
    if len(set(stems)) < len(stems):
        raise ValueError("shards from different folders share file names: their kept-uid files would collide")
    folder.mkdir(parents=True, exist_ok=True)
    in_count, dropped, used, kept_counts = 0, Counter(), [], []
    for table in _verdict_tables(shards, decisions, undecided):
        keep = table.column("keep")
        in_count += table.num_rows
        dropped.update(_reason_counts(_reason_kinds(pc.filter(table.column("reason"), pc.invert(keep)))))
        kept = table.filter(keep).select(["uid", "shard"])
        counts = pc.value_counts(kept.column("shard"))
        per_shard = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
        start = 0
        for index in sorted(per_shard):
            n = per_shard[index]
            write_parquet(mask_file(folder, shards[index]), kept.slice(start, n).select(["uid"]))
            used.append(shards[index])
            kept_counts.append(n)
            start += n
    return KeptMask(used, kept_counts, str(folder), in_count, dict(sorted(dropped.items())))


def _verdict_tables(shards: list[str], decisions: str | Path | pa.Table | None, undecided: str) -> Iterator[pa.Table]:
    """The shards' rows with their verdicts: one shard at a time when the decisions are a folder of a
    file per shard (as dedupe and filter write them; a shard without one is undecided), so memory
    follows a shard, not the pool, and a uid named twice is caught within its shard; else all at once."""
    per_shard = decisions if isinstance(decisions, str | Path) and Path(decisions).is_dir() else None
    if per_shard is not None:
        for index, shard in enumerate(shards):
            rows = shard_rows([shard])
            rows = rows.set_column(1, "shard", pa.array(np.full(rows.num_rows, index, np.int32)))
            path = mask_file(per_shard, shard)
            yield _with_verdicts(rows, pq.read_table(path) if path.exists() else NO_DECISIONS, undecided)
    else:
        yield _with_verdicts(shard_rows(shards), decisions, undecided)


def kept_slice(folder: str | Path, shard: str | Path, start: int, stop: int) -> list[str]:
    """Kept uids `start:stop` of one shard, in its tar's order."""
    return pq.read_table(mask_file(folder, shard), columns=["uid"]).column("uid")[start:stop].to_pylist()


@lru_cache(maxsize=8)
def kept_uids(folder: str, shard: str) -> frozenset[str]:
    """One shard's kept uids, read when the loader first draws that shard (a few shards cached)."""
    return frozenset(pq.read_table(mask_file(folder, shard), columns=["uid"]).column("uid").to_pylist())
