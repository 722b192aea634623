"""MetaCLIP balancing (Xu et al. 2023): match captions to a metadata vocabulary, cap each entry.

Every caption is matched against the vocabulary (see `filters.vocabulary`). Captions that match
nothing are dropped. An entry matched by more than t captions is a "head" entry; each caption
keeps a draw of probability min(1, t / count) per matched entry and survives if any draw
succeeds, so tail entries are kept whole and head entries are flattened to about t samples.
MetaCLIP-400M used t = 20,000; by default t scales with the pool (`t_pool` = the pool size t was
set for). Draws hash (seed, uid, entry), so the result is the same in any order or sharding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from filters.base import FilterResult
from filters.vocabulary import TermMatcher, load_terms
from pipeline.models import StrictModel

NEEDS = ("caption",)


class MetaclipBalanceParams(StrictModel):
    name: Literal["metaclip_balance"] = "metaclip_balance"
    words: list[str] | None = Field(None, description="metadata entries; default: the eval set's class names")
    vocabulary: str | None = Field(None, description="metadata file, one entry per line")
    t: float = Field(20_000, gt=0, description="samples per entry before sampling starts (MetaCLIP-400M: 20k)")
    t_pool: int | None = Field(
        400_000_000, gt=0, description="pool size t was set for; t scales by pool/t_pool. null: use t as given"
    )
    seed: int = 0


def uniform_draw(seed: int, uid: str, entry: str) -> float:
    """A deterministic number in [0, 1) for this (seed, uid, entry)."""
    digest = hashlib.blake2b(f"{seed}\x1f{uid}\x1f{entry}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def effective_t(params: MetaclipBalanceParams, pool_size: int) -> float:
    return params.t * pool_size / params.t_pool if params.t_pool else params.t


@dataclass(frozen=True)
class EntryCounts:
    """Captions matching each entry over the whole pool, and the pool's size: what a shard needs."""

    counts: np.ndarray
    pool_size: int

    @staticmethod
    def total(parts: list[EntryCounts]) -> EntryCounts:
        if not parts:
            return EntryCounts(np.zeros(0, np.int64), 0)
        return EntryCounts(np.sum([p.counts for p in parts], axis=0), sum(p.pool_size for p in parts))


def _terms(params: MetaclipBalanceParams) -> list[str]:
    terms = load_terms(params.words, params.vocabulary)
    if not terms:
        raise ValueError("metaclip_balance: the vocabulary is empty (set words or vocabulary)")
    return terms


def _matches(table: pa.Table, terms: list[str]) -> list[list[int]]:
    matcher = TermMatcher(terms)
    return [matcher.matches(c or "") for c in table.column("caption").to_pylist()]


def entry_counts(table: pa.Table, params: MetaclipBalanceParams) -> EntryCounts:
    """This table's share of the pool's entry counts (shards' shares add up: `EntryCounts.total`)."""
    terms = _terms(params)
    return _count(_matches(table, terms), len(terms))


def _count(matched: list[list[int]], n_terms: int) -> EntryCounts:
    counts = np.bincount([e for entries in matched for e in entries], minlength=n_terms).astype(np.int64)
    return EntryCounts(counts, len(matched))


def apply(table: pa.Table, params: MetaclipBalanceParams, pool: EntryCounts | None = None) -> FilterResult:
    """Balance against the `pool`'s entry counts (a shard's case), else this table's own."""
    terms = _terms(params)
    uids = table.column("uid").to_pylist()
    matched = _matches(table, terms)
    pool = pool or _count(matched, len(terms))
    counts = pool.counts
    t = effective_t(params, pool.pool_size)
    keep_probability = np.minimum(1.0, t / np.maximum(counts, 1))
    keep = np.zeros(len(uids), bool)
    reason: list[str | None] = []
    for row, (uid, entries) in enumerate(zip(uids, matched, strict=True)):
        if not entries:
            reason.append("metaclip:no_match")
            continue
        keep[row] = any(uniform_draw(params.seed, uid, terms[e]) < keep_probability[e] for e in entries)
        reason.append(None if keep[row] else "metaclip:head_sampled")
    result = FilterResult(uids, keep, reason)
    result.metrics.update(
        {
            "t": float(t),
            "entries_matched": float((counts > 0).sum()),
            "head_entries": float((counts > t).sum()),
        }
    )
    return result
