"""The filter stage's verdicts: one row per sample with its final keep/reason and each step's own
keep and score (`decisions_table`), and the kept uids in DataComp's list format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from filters.strategy import StrategyResult
from filters.uid_list import UidListError, to_datacomp
from pipeline.atomic import write_with
from pipeline.stage import Decisions

KEPT_UIDS = "kept_uids.npy"


class FilterOutputs(Decisions):
    kept_uids: str | None = None  # DataComp's uid-list format (filters.uid_list): feeds its resharder


def decisions_table(pool: pa.Table, failure: list[str | None], result: StrategyResult) -> pa.Table:
    """One row per pool sample: final keep/reason plus each step's keep and score."""
    n = pool.num_rows
    ok_rows = np.flatnonzero([f is None for f in failure])
    keep = np.zeros(n, bool)
    keep[ok_rows] = result.keep
    reason: list[str | None] = [f"failed:{f}" if f else None for f in failure]
    for row, r in zip(ok_rows, result.reason, strict=True):
        reason[row] = r
    columns: dict[str, pa.Array] = {"uid": pool.column("uid"), "keep": pa.array(keep), "reason": pa.array(reason)}
    for index, (_, step) in enumerate(result.steps):
        label = result.step_label(index)
        step_keep = np.zeros(n, bool)
        step_keep[ok_rows] = step.keep
        columns[f"keep_{label}"] = pa.array(step_keep)
        if step.scores is not None:
            scores = np.full(n, np.nan, np.float32)
            scores[ok_rows] = step.scores
            columns[f"score_{label}"] = pa.array(scores)
    return pa.table(columns)


def kept_pairs(decisions: pa.Table) -> np.ndarray | None:
    """The kept uids as DataComp's sorted `u8,u8` pairs (None when the uids are not DataComp's
    32-digit hex, e.g. a table's own uids of another shape)."""
    kept = decisions.filter(decisions.column("keep")).column("uid")
    try:
        return to_datacomp(kept)
    except UidListError:
        return None


def write_kept_uids(path: Path, pairs: np.ndarray | None) -> str | None:
    """DataComp's uid-list `.npy`, for its resharder and evaluation (None: not written)."""
    if pairs is None:
        return None
    write_with(path, lambda tmp: np.save(tmp.open("wb"), pairs))
    return str(path)
