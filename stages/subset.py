"""subset stage: the kept samples of a strategy (or of dedupe alone) materialised as new shards.

Reads the latest decisions made before it (the filter stage's, else dedupe's) and the download
shards. Every downloaded sample ends up kept, dropped under the reason its decision gave (per-uid
reasons such as `duplicate_of:<uid>` folded into their kind), or failed: `not_hashed` for
samples the decisions never saw (the phash stage could not decode them), `missing_in_tar` for
samples a truncated shard lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from filters.phash_dedupe import DUPLICATE, EVAL_DUPLICATE, reason_kind
from pipeline.manifest import Manifest
from pipeline.models import StrictModel
from pipeline.stage import Decisions, PlanRow, RunContext, Shards, Stage
from stages.download import DownloadOutputs
from stages.shards import reshard

UNDECIDED = "not_hashed"  # downloaded samples no decision covers: the phash stage could not decode them


class SubsetConfig(StrictModel):
    samples_per_shard: int = Field(10_000, gt=0)


def subset_reason(reason: str) -> str:
    """The reason a subset counts a dropped sample under: per-uid dedupe reasons fold into their kind."""
    per_uid = reason.startswith((f"{DUPLICATE}:", f"{EVAL_DUPLICATE}:"))
    return reason_kind(reason) if per_uid else reason


def selection(decisions: pa.Table) -> tuple[set[str], dict[str, str]]:
    """(uids to keep, reason per dropped uid) from a decisions table (uid, keep, reason)."""
    rows = zip(*(decisions.column(c).to_pylist() for c in ("uid", "keep", "reason")), strict=True)
    keep, reasons = set(), {}
    for uid, kept, reason in rows:
        if kept:
            keep.add(uid)
        else:
            reasons[uid] = subset_reason(reason or "dropped")
    return keep, reasons


class SubsetOutputs(Shards):
    pass


@dataclass
class SubsetInputs:
    shards: DownloadOutputs
    decisions: Decisions  # the latest: the filter strategy's, else dedupe's alone


class Subset(Stage):
    name = "subset"
    summary = "materialise the kept samples as new shards"
    config_model = SubsetConfig
    Inputs = SubsetInputs
    Outputs = SubsetOutputs
    counts_from = "shards"

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        output = str(run_dir / self.name / "shards")
        note = f"shards of {self.config.samples_per_shard:,}"
        return PlanRow(self.name, "download shards + the latest decisions", output, rows, note, "driver, 1 process")

    def run(self, ctx: RunContext, inputs: SubsetInputs) -> tuple[SubsetOutputs, Manifest]:
        keep, reasons = selection(pq.read_table(inputs.decisions.decisions, columns=["uid", "keep", "reason"]))
        manifest = reshard(
            sorted(Path(inputs.shards.shards_dir).glob("*.tar")),
            self.stage_dir(ctx) / "shards",
            self.config.samples_per_shard,
            keep_uids=keep,
            stage=self.name,
            drop_reasons=reasons,
            default_reason=UNDECIDED,
        )
        outputs = SubsetOutputs.model_validate({**manifest.outputs, "applied": inputs.decisions.decisions})
        manifest.outputs = outputs.as_dict()
        return outputs, manifest
