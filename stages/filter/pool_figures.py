"""The figures of the whole pool that some filters decide by, found shard by shard.

A top-fraction rank needs the pool's cutoff, `image_based` its centroids, `metaclip_balance` its
entry counts, `semantic_dedupe` the pairs its clusters span. Each is found with passes of one
task per shard that return small results, so the driver never holds the pool's rows:

- rank: an exact radix select over order keys of the scores, 16 bits a pass, until the rows that
  share the boundary's prefix are few enough to gather (`GATHER_ROWS`); then (score, uid) breaks
  ties exactly as the whole-table ranking does. Rows tied at exactly the boundary score are split
  the same way on their uids' bytes, so a column of few distinct values gathers no more.
- image_based: the rows `clustering.fit_rows` names (at most its fit sample) are gathered in the
  order the whole-table fit feeds them, so the centroids are the same.
- metaclip_balance: per-shard entry counts, added up.
- semantic_dedupe: its clusters span shards, so the rows are shuffled by k-means cluster and each
  partition of clusters is deduplicated in a task (`semantic_shuffle`); a shard's decide task
  reads its rows' verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from filters import image_based, metaclip_balance, semantic_dedupe
from filters.base import embedding_matrix
from filters.clustering import fit_rows, unit_rows
from filters.ranking import KEEP_NONE, Cutoff, RankParams, n_kept, order_keys, ranked_order, signed_scores
from filters.registry import FILTERS
from pipeline.mapping import MapFn
from stages.filter.pool_table import PoolSources, shard_pool_table, upstream_failure
from stages.filter.semantic_shuffle import pool_semantic_pieces

DIGIT_BITS = 16
KEY_BITS = 64
GATHER_ROWS = 200_000  # rows sharing the boundary prefix that are gathered to finish a rank exactly


@dataclass(frozen=True)
class ShardRead:
    """One shard's usable rows, with only the embed columns a pass needs (None: all)."""

    sources: PoolSources
    stem: str
    embed_columns: tuple[str, ...] | None = None

    def usable(self) -> pa.Table:
        return usable_rows(shard_pool_table(self.sources, self.stem, self.embed_columns))[0]


def usable_rows(table: pa.Table) -> tuple[pa.Table, list[str | None]]:
    """(the rows every earlier stage processed, each row's upstream failure or None)."""
    failure = upstream_failure(table)
    return table.filter(pa.array([f is None for f in failure], pa.bool_())), failure


def count_usable(read: ShardRead) -> int:
    return read.usable().num_rows


@dataclass(frozen=True)
class PerShard:
    """A figure that differs per shard (each shard's own verdicts): the shard's piece is its part."""

    pieces: dict[str, object]


def piece_for(figure: object, stem: str) -> object:
    return figure.pieces[stem] if isinstance(figure, PerShard) else figure


def pool_figures(
    steps: list, reads: list[ShardRead], usable: list[int], map_fn: MapFn, work: Path
) -> list[object | None]:
    """One figure per step (None for a step whose verdict depends on its row alone); a shuffle's
    files go under `work`, for the caller to remove once the shards are decided."""
    figures: list[object | None] = []
    for params in steps:
        if not FILTERS[params.name].pooled(params):
            figures.append(None)
        elif isinstance(params, RankParams):
            figures.append(pool_cutoff(params, reads, sum(usable), map_fn))
        elif isinstance(params, image_based.ImageBasedParams):
            figures.append(pool_centroids(params, reads, usable, map_fn))
        elif isinstance(params, metaclip_balance.MetaclipBalanceParams):
            figures.append(pool_entry_counts(params, reads, map_fn))
        elif isinstance(params, semantic_dedupe.SemanticDedupeParams):
            embeddings = [ShardRead(r.sources, r.stem, ("image_emb",)) for r in reads]
            scratch = work / f"semantic-{len(figures)}"
            pieces = pool_semantic_pieces(params, embeddings, usable, scratch, map_fn, fit_sample)
            figures.append(PerShard(pieces))
        else:
            raise NotImplementedError(f"filter '{params.name}' needs a figure of the pool that no pass finds")
    return figures


# ---- rank: an exact radix select -------------------------------------------------------------


@dataclass(frozen=True)
class KeyPass:
    """Count the next digit of the rows under a prefix, or with `gather`, return their keys and uids.

    The first `KEY_LEVELS` digits are the score key's (`prefix`, its first `level` digits); past
    them, rows share one score and the digits are their uids' UTF-8 bytes, two at a time, after
    `uid_prefix` (byte order is uid order), so that a tie as large as the pool is still split
    exactly without gathering it."""

    read: ShardRead
    params: RankParams
    prefix: int
    level: int
    gather: bool
    uid_prefix: bytes = b""


KEY_LEVELS = KEY_BITS // DIGIT_BITS
UID_BYTES_MAX = 1024  # uids equal for this many bytes are gathered as they are


def _keys(read: ShardRead, params: RankParams) -> tuple[np.ndarray, np.ndarray]:
    table = read.usable()
    scores = signed_scores(table, params)
    valid = ~np.isnan(scores)
    uids = np.asarray(table.column("uid").to_pylist(), dtype=object)[valid]
    return order_keys(scores[valid]), uids


def _uid_bytes(uids: np.ndarray, width: int) -> np.ndarray:
    """(rows, width) uint8: each uid's UTF-8 bytes, cut or zero-padded to `width`."""
    encoded = np.array([u.encode() for u in uids], dtype=f"S{width}")
    return encoded.view(np.uint8).reshape(len(uids), width)


def key_pass(job: KeyPass) -> tuple[np.ndarray, np.ndarray]:
    keys, uids = _keys(job.read, job.params)
    levels = min(job.level, KEY_LEVELS)
    if levels:
        under = (keys >> np.uint64(KEY_BITS - DIGIT_BITS * levels)) == np.uint64(job.prefix)
        keys, uids = keys[under], uids[under]
    known = len(job.uid_prefix)
    if known:
        under = (_uid_bytes(uids, known) == np.frombuffer(job.uid_prefix, np.uint8)).all(axis=1)
        keys, uids = keys[under], uids[under]
    if job.gather:
        return keys, uids
    if job.level < KEY_LEVELS:
        shift = np.uint64(KEY_BITS - DIGIT_BITS * (job.level + 1))
        return np.unique((keys >> shift) & np.uint64((1 << DIGIT_BITS) - 1), return_counts=True)
    pair = _uid_bytes(uids, known + 2)[:, known:].astype(np.int64)
    return np.unique(pair[:, 0] * 256 + pair[:, 1], return_counts=True)


def pool_cutoff(params: RankParams, reads: list[ShardRead], n_usable: int, map_fn: MapFn) -> Cutoff:
    """The cutoff `filters.ranking.table_cutoff` would find on the whole pool, found shard by shard."""
    wanted = n_kept(params, n_usable)
    reads = [ShardRead(r.sources, r.stem, (params.score_column,)) for r in reads]
    prefix, level, above, under_prefix, uid_prefix = 0, 0, 0, n_usable, b""
    desc = f"filter: {params.name} cutoff"
    while wanted > 0:
        if under_prefix <= GATHER_ROWS or len(uid_prefix) >= UID_BYTES_MAX:
            parts = map_fn(key_pass, [KeyPass(r, params, prefix, level, True, uid_prefix) for r in reads], desc=desc)
            keys = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, np.uint64)
            if len(keys) == 0:
                return KEEP_NONE
            uids = np.concatenate([u for _, u in parts]).astype(str)
            last = ranked_order(keys, uids)[min(wanted - above, len(keys)) - 1]
            return Cutoff(int(keys[last]), str(uids[last]))
        counts = np.zeros(1 << DIGIT_BITS, np.int64)
        jobs = [KeyPass(r, params, prefix, level, False, uid_prefix) for r in reads]
        for digits, n in map_fn(key_pass, jobs, desc=desc):
            np.add.at(counts, digits.astype(np.int64), n)
        if level == 0:
            if counts.sum() == 0:
                return KEEP_NONE
            wanted = min(wanted, int(counts.sum()))  # more than the scored rows: keep every scored row
        if level < KEY_LEVELS:  # higher scores rank first
            from_top = np.cumsum(counts[::-1])  # rows whose digit is this one or higher
            digit = (1 << DIGIT_BITS) - 1 - int(np.searchsorted(from_top, wanted - above))
            above += int(from_top[(1 << DIGIT_BITS) - 2 - digit]) if digit < (1 << DIGIT_BITS) - 1 else 0
            prefix = (prefix << DIGIT_BITS) | digit
        else:  # one score: lower uids rank first
            upto = np.cumsum(counts)
            digit = int(np.searchsorted(upto, wanted - above))
            above += int(upto[digit - 1]) if digit else 0
            uid_prefix += bytes([digit >> 8, digit & 0xFF])
        level, under_prefix = level + 1, int(counts[digit])
    return KEEP_NONE


# ---- image_based: the fit sample, gathered --------------------------------------------------


@dataclass(frozen=True)
class RowsPass:
    read: ShardRead
    rows: np.ndarray | None  # positions among the shard's usable rows, ascending; None: all


def unit_embeddings(job: RowsPass) -> np.ndarray:
    embeddings = unit_rows(embedding_matrix(job.read.usable(), "image_emb"))
    return embeddings if job.rows is None else embeddings[job.rows]


def pool_centroids(
    params: image_based.ImageBasedParams, reads: list[ShardRead], usable: list[int], map_fn: MapFn
) -> image_based.PoolCentroids:
    sample = fit_sample(reads, usable, params.seed, map_fn, "filter: image_based sample")
    return image_based.fit(sample, sum(usable), params)


def fit_sample(reads: list[ShardRead], usable: list[int], seed: int, map_fn: MapFn, desc: str) -> np.ndarray:
    """The unit image embeddings a one-table k-means fit is fed (`clustering.fit_rows`), in its order."""
    rows = fit_rows(sum(usable), seed)
    reads = [ShardRead(r.sources, r.stem, ("image_emb",)) for r in reads]
    if rows is None:
        return _stack(map_fn(unit_embeddings, [RowsPass(r, None) for r in reads], desc=desc))
    starts = np.concatenate([[0], np.cumsum(usable)])
    shard_of = np.searchsorted(starts, rows, side="right") - 1
    jobs, slots = [], []
    for index, read in enumerate(reads):
        at = np.flatnonzero(shard_of == index)
        if len(at):
            at = at[np.argsort(rows[at])]
            jobs.append(RowsPass(read, rows[at] - starts[index]))
            slots.append(at)
    parts = map_fn(unit_embeddings, jobs, desc=desc)
    sample = np.empty((len(rows), parts[0].shape[1]), np.float32)
    for at, part in zip(slots, parts, strict=True):
        sample[at] = part
    return sample


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    nonempty = [p for p in parts if len(p)]
    return np.concatenate(nonempty) if nonempty else np.zeros((0, 0), np.float32)


# ---- metaclip_balance: entry counts ----------------------------------------------------------


@dataclass(frozen=True)
class CountPass:
    read: ShardRead
    params: metaclip_balance.MetaclipBalanceParams


def entry_counts(job: CountPass) -> metaclip_balance.EntryCounts:
    return metaclip_balance.entry_counts(job.read.usable(), job.params)


def pool_entry_counts(
    params: metaclip_balance.MetaclipBalanceParams, reads: list[ShardRead], map_fn: MapFn
) -> metaclip_balance.EntryCounts:
    jobs = [CountPass(ShardRead(r.sources, r.stem, ()), params) for r in reads]
    return metaclip_balance.EntryCounts.total(map_fn(entry_counts, jobs, desc="filter: metaclip counts"))
