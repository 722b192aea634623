"""Training from the pool's own shards with a strategy's kept uids, instead of a filtered copy.

A sweep at DataComp scale cannot write a subset of the pool for every strategy (eleven 30% copies
of xlarge would be ~1.5 PB). When the train stage reads shards that the latest decisions were not
applied to (the download's, in a run without a subset stage), it writes a *kept-uid mask*: one small
parquet of kept uids per shard (`kept/<shard>.parquet`), and the loader skips every other sample
as the shard streams by. Shards that keep nothing are left out; the others are drawn uniformly and
read whole, so every kept sample is drawn equally often, as from the subset's shards.

Accounting matches the subset stage's: every sample of the shards' tables is kept, dropped under its
decision's reason (per-uid dedupe reasons folded into their kind), or dropped as `not_hashed` when no
decision covers it. Scale: this step holds the uid, keep and reason columns of the shards' tables
in one process (vectorised joins, no per-row Python); each loader holds one shard's kept uids at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.phash_dedupe import DUPLICATE, EVAL_DUPLICATE
from pipeline.atomic import write_parquet
from stages.shards import only_successes
from stages.subset import UNDECIDED  # a sample no decision covers: counted as the subset stage counts it

MASK_DIR = "kept"


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


def _shard_rows(shards: list[str]) -> pa.Table:
    """(uid, shard index) of every successful row of the shards' parquet tables."""
    tables = []
    for index, shard in enumerate(shards):
        path = Path(shard).with_suffix(".parquet")
        columns = [c for c in ("uid", "status") if c in pq.read_schema(path).names]  # not captions, urls, ...
        rows = only_successes(pq.read_table(path, columns=columns))
        tables.append(pa.table({"uid": rows.column("uid"), "shard": np.full(rows.num_rows, index, np.int32)}))
    return pa.concat_tables(tables)


def _reason_kinds(reasons: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per-uid dedupe reasons ('duplicate_of:<uid>') folded into their kind, vectorised."""
    for kind in (EVAL_DUPLICATE, DUPLICATE):  # the longer prefix first: it contains the shorter
        reasons = pc.if_else(pc.starts_with(reasons, f"{kind}:"), kind, reasons)
    return reasons


def _reason_counts(reasons: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(reasons)
    return dict(sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)))


def write_kept_mask(shards: list[str], decisions: str | Path, folder: Path) -> KeptMask:
    """Join the shards' uids with the decisions; write each shard's kept uids under `folder`."""
    rows = _shard_rows(shards)
    verdicts = pq.read_table(decisions, columns=["uid", "keep", "reason"])
    verdicts = verdicts.set_column(2, "reason", verdicts.column("reason").cast(pa.string()))  # all null: type null
    joined = rows.join(verdicts, "uid", join_type="left outer")
    keep = pc.fill_null(joined.column("keep"), False)
    undecided = pc.is_null(joined.column("keep"))
    reasons = pc.if_else(undecided, UNDECIDED, pc.fill_null(joined.column("reason"), "dropped"))
    dropped = _reason_counts(_reason_kinds(pc.filter(reasons, pc.invert(keep))))
    kept = joined.filter(keep).select(["uid", "shard"])
    kept = kept.take(pc.sort_indices(kept, [("shard", "ascending"), ("uid", "ascending")]))
    folder.mkdir(parents=True, exist_ok=True)
    counts = pc.value_counts(kept.column("shard"))
    per_shard = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
    start, used, kept_counts = 0, [], []
    for index in sorted(per_shard):
        n = per_shard[index]
        write_parquet(mask_file(folder, shards[index]), kept.slice(start, n).select(["uid"]))
        used.append(shards[index])
        kept_counts.append(n)
        start += n
    return KeptMask(used, kept_counts, str(folder), rows.num_rows, dropped)


@lru_cache(maxsize=8)
def kept_uids(folder: str, shard: str) -> frozenset[str]:
    """One shard's kept uids, read when the loader first draws that shard (a few shards cached)."""
    return frozenset(pq.read_table(mask_file(folder, shard), columns=["uid"]).column("uid").to_pylist())
