"""Score stage decisions against the demo pool's planted ground truth.

Only meaningful for the generated demo pool; the orchestrator logs these as metrics so a
change that hurts a filter shows up as a number, not as a hunch.
"""

from __future__ import annotations

import pyarrow as pa

from filters.phash_dedupe import DUPLICATE, EVAL_DUPLICATE

COPY_DEFECTS = {"exact_duplicate", "near_duplicate"}


def _representative(decisions: pa.Table) -> tuple[dict[str, str], set[str]]:
    """uid -> the uid kept for its cluster; plus the uids dropped as eval copies."""
    rep, eval_dropped = {}, set()
    for uid, keep, reason in zip(*(decisions.column(c).to_pylist() for c in ("uid", "keep", "reason")), strict=True):
        if keep:
            rep[uid] = uid
        elif reason and reason.startswith(DUPLICATE + ":"):
            rep[uid] = reason.split(":", 1)[1]
        elif reason and reason.startswith(EVAL_DUPLICATE + ":"):
            eval_dropped.add(uid)
    return rep, eval_dropped


def dedupe_quality(decisions: pa.Table, ground_truth: pa.Table) -> dict[str, float]:
    """Precision/recall of duplicate and eval-leak removal against the planted defects."""
    rep, eval_dropped = _representative(decisions)
    truth = ground_truth.to_pylist()
    original_of = {r["uid"]: r["duplicate_of"] for r in truth if r["defect"] in COPY_DEFECTS}

    def group(uid: str) -> str:
        return original_of.get(uid, uid)

    caught: dict[str, list[bool]] = {}
    for row in truth:
        uid, original = row["uid"], row["duplicate_of"]
        if row["defect"] not in COPY_DEFECTS or uid not in rep or original not in rep:
            continue
        kind = "exact" if row["defect"] == "exact_duplicate" else row["detail"]
        caught.setdefault(kind, []).append(rep[uid] == rep[original])
    dropped = [uid for uid, kept_as in rep.items() if kept_as != uid]
    correct = sum(group(uid) == group(rep[uid]) for uid in dropped)
    all_caught = [c for values in caught.values() for c in values]
    leaks = {r["uid"] for r in truth if r["defect"] == "eval_leak"} & (set(rep) | eval_dropped)
    metrics = {
        "dedupe_precision": correct / len(dropped) if dropped else 1.0,
        "dedupe_recall": sum(all_caught) / len(all_caught) if all_caught else 1.0,
        "eval_leak_precision": len(eval_dropped & leaks) / len(eval_dropped) if eval_dropped else 1.0,
        "eval_leak_recall": len(eval_dropped & leaks) / len(leaks) if leaks else 1.0,
    }
    metrics.update({f"dedupe_recall_{kind}": sum(v) / len(v) for kind, v in sorted(caught.items())})
    return metrics
