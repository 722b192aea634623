"""Heads stage: fit the aesthetic and NSFW heads on a labelled slice of the pool's embeddings.

Labels are a table of uid plus `rating` (1-10, for the aesthetic head) and/or `unsafe` (bool,
for the NSFW head). Only labelled uids are used, so the rest of the pool stays unseen and can
measure the heads honestly. Heads are written as `<stage>/aesthetic.pt` and `nsfw.pt`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import AliasChoices, Field

from filters.base import embedding_matrix
from filters.heads import HeadInfo, fit_head, save_head
from pipeline.manifest import Manifest, count_reasons
from pipeline.models import StrictModel
from pipeline.stage import PlanRow, RunContext, SourceOutputs, Stage, StageOutputs, check_labels
from stages.embed import EmbedOutputs, read_embedding_tables

HEAD_TARGETS = {"aesthetic": ("rating", "regression"), "nsfw": ("unsafe", "binary")}


class HeadsConfig(StrictModel):
    labels: str | None = Field(None, description="parquet: uid, rating and/or unsafe; default: the source's labels")
    heads: list[str] = Field(["aesthetic", "nsfw"], description="which heads to fit")
    epochs: int = Field(300, gt=0)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


def run_fit_heads(
    embeddings_dir: Path, labels: pa.Table, config: HeadsConfig, stage_dir: Path, embedding_model: str
) -> Manifest:
    started = time.perf_counter()
    unknown = sorted(set(config.heads) - set(HEAD_TARGETS))
    if unknown:
        raise ValueError(f"heads: unknown head {unknown[0]} (available: {', '.join(HEAD_TARGETS)})")
    embedded = read_embedding_tables(embeddings_dir, only_uids=labels.column("uid"))  # the labelled rows alone
    position = {u: i for i, u in enumerate(embedded.column("uid").to_pylist())}
    embed_reasons = embedded.column("reason").to_pylist()
    uids = labels.column("uid").to_pylist()
    reasons = [embed_reasons[position[u]] if u in position else "not_embedded" for u in uids]
    usable = np.array([r is None for r in reasons])
    rows = np.array([position[u] for u, ok in zip(uids, usable, strict=True) if ok], np.int64)
    vectors = embedding_matrix(embedded.take(pa.array(rows)), "image_emb") if len(rows) else np.zeros((0, 1))
    stage_dir.mkdir(parents=True, exist_ok=True)
    outputs, metrics = {}, {}
    for name in config.heads:
        column, kind = HEAD_TARGETS[name]
        if column not in labels.column_names:
            raise ValueError(f"heads: the labels table has no '{column}' column for the {name} head")
        values = pc.cast(labels.column(column), pa.float32()).to_numpy(zero_copy_only=False)[usable]
        known = ~np.isnan(values)
        head, fit_metrics = fit_head(
            vectors[known], values[known], kind, epochs=config.epochs, lr=config.lr, seed=config.seed
        )
        info = HeadInfo(
            kind=kind,
            activation=True,
            input_dim=vectors.shape[1],
            target=column,
            embedding_model=embedding_model,
            metrics=fit_metrics,
        )
        outputs[name] = str(save_head(head, info, stage_dir / name))
        metrics.update({f"{name}_{k}": v for k, v in fit_metrics.items()})
    return Manifest(
        stage="heads",
        **{"in": len(uids)},
        kept=int(usable.sum()),
        failed=count_reasons([r for r in reasons if r is not None]),
        outputs=HeadsOutputs(**outputs).as_dict(),
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )


class HeadsOutputs(StageOutputs):
    """One fitted head per name: the default `head` of the filter of the same name."""

    aesthetic: str | None = Field(None, validation_alias=AliasChoices("aesthetic", "aesthetic_head"))
    nsfw: str | None = Field(None, validation_alias=AliasChoices("nsfw", "nsfw_head"))  # `*_head`: older runs


@dataclass
class HeadsInputs:
    embed: EmbedOutputs
    source: SourceOutputs | None = None  # its labels, unless heads.labels is set


class Heads(Stage):
    name = "heads"
    summary = "fit the aesthetic and NSFW heads on labelled embeddings"
    config_model = HeadsConfig
    Inputs = HeadsInputs
    Outputs = HeadsOutputs

    def check(self, before: list[Stage]) -> None:
        check_labels(self, self.config.labels, before)
        unknown = sorted(set(self.config.heads) - set(HEAD_TARGETS))
        if unknown:
            raise ValueError(f"heads: unknown head {unknown[0]} (available: {', '.join(HEAD_TARGETS)})")

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        note = f"{', '.join(self.config.heads)} head(s) on image embeddings, {self.config.epochs} epochs"
        return PlanRow(self.name, self.config.labels or "the source's labels", str(run_dir / self.name), None, note)

    def run(self, ctx: RunContext, inputs: HeadsInputs) -> tuple[HeadsOutputs, Manifest]:
        labels = pq.read_table(self.config.labels or inputs.source.labels)
        embed = inputs.embed
        manifest = run_fit_heads(Path(embed.embeddings_dir), labels, self.config, self.stage_dir(ctx), embed.model)
        return self.finished(manifest)
