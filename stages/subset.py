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

from pydantic import Field

from pipeline.manifest import Manifest
from pipeline.models import StrictModel
from pipeline.stage import Decisions, PlanRow, RunContext, Shards, Stage
from stages.download import DownloadOutputs
from stages.selection import UNDECIDED
from stages.shard_copy import reshard


class SubsetConfig(StrictModel):
    samples_per_shard: int = Field(10_000, gt=0)


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
        return PlanRow(
            self.name, "download shards + the latest decisions", output, rows, note, "1 CPU per new-shard task"
        )

    def run(self, ctx: RunContext, inputs: SubsetInputs) -> tuple[SubsetOutputs, Manifest]:
        manifest = reshard(
            sorted(Path(inputs.shards.shards_dir).glob("*.tar")),
            self.stage_dir(ctx) / "shards",
            self.config.samples_per_shard,
            decisions=inputs.decisions.decisions,
            undecided=UNDECIDED,
            stage=self.name,
            map_fn=ctx.map_fn,
        )
        outputs = SubsetOutputs.model_validate({**manifest.outputs, "applied": inputs.decisions.decisions})
        manifest.outputs = outputs.as_dict()
        return outputs, manifest
