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


# what each filter is meant to catch among the planted defects (dedupe has its own metrics above)
FILTER_TARGETS = {
    "basic": {"bad_caption"},
    "clip_score": {"mismatched_caption", "bad_caption"},  # pairs whose text does not describe the image
    "dfn": {"mismatched_caption", "bad_caption"},
    "aesthetic": {"low_quality"},
    "nsfw": {"unsafe"},
    "semantic_dedupe": COPY_DEFECTS,  # scored by uid: dropping the original instead of its copy counts as a miss
}


def filter_quality(decisions: pa.Table, ground_truth: pa.Table, exclude: set[str] | None = None) -> dict[str, float]:
    """Per strategy step (a `keep_<i>_<filter>` column of the filter stage's decisions): precision
    and recall of its drops against the defects that filter targets.

    Samples an earlier stage failed are not scored (no filter saw them); nor are the uids in
    `exclude`, those the filters were fitted on (the labelled slice).
    """
    defect = dict(zip(ground_truth.column("uid").to_pylist(), ground_truth.column("defect").to_pylist(), strict=True))
    exclude = exclude or set()
    uids = decisions.column("uid").to_pylist()
    seen = [
        not (r or "").startswith("failed:") and u not in exclude
        for u, r in zip(uids, decisions.column("reason").to_pylist(), strict=True)
    ]
    metrics: dict[str, float] = {}
    for column in decisions.column_names:
        label = column.removeprefix("keep_")
        targets = FILTER_TARGETS.get(label.split("_", 1)[-1]) if column.startswith("keep_") else None
        if not targets:
            continue
        scored = [(u, k) for u, k, s in zip(uids, decisions.column(column).to_pylist(), seen, strict=True) if s]
        dropped = [uid for uid, kept in scored if not kept]
        positives = [uid for uid, _ in scored if defect.get(uid) in targets]
        hits = sum(defect.get(uid) in targets for uid in dropped)
        metrics[f"{label}.precision"] = hits / len(dropped) if dropped else 1.0
        metrics[f"{label}.recall"] = hits / len(positives) if positives else 1.0
        metrics[f"{label}.targets"] = float(len(positives))
        # the precision of dropping the same number at random: the floor any real filter must beat
        metrics[f"{label}.prevalence"] = len(positives) / len(scored) if scored else 0.0
    return metrics
