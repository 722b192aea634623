"""The stage graph, derived from what each stage declares (`pipeline.stage`).

Nothing here names a stage: which stage feeds which, whether a recipe's stage list can run, the
dry-run plan and which stages a sweep must run once per strategy all follow from the `Inputs`
types and `counts_from` of the stages in `stages.registry.STAGES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, Recipe, source_outputs
from pipeline.stage import InputSlot, MissingInput, PlanRow, Stage, StageOutputs, input_slots, producer
from stages.registry import STAGES

STAGE_BY_NAME: dict[str, type[Stage]] = {stage.name: stage for stage in STAGES}


def _fail(recipe: Recipe, message: str) -> ConfigError:
    return ConfigError(f"invalid recipe '{recipe.name}': {message}")


def _producer_names(slot: InputSlot) -> str:
    """The stages that make what `slot` takes from scratch (not those that refine it, e.g. prefilter)."""
    names = [
        stage.name
        for stage in STAGES
        if issubclass(stage.Outputs, slot.kind) and not any(s.kind is slot.kind for s in input_slots(stage))
    ]
    return " or ".join(f"'{name}'" for name in names) or f"a stage giving {slot.kind.__name__}"


def build_stages(recipe: Recipe, check: bool = True, missing: list[MissingInput] | None = None) -> list[Stage]:
    """The recipe's stages, checked: names exist, no repeats, every input made before it is read;
    and, with `check`, each stage's own checks (files exist, filters have their columns). Given a
    `missing` list, inputs that are not there yet (a model, a head) are added to it, not raised."""
    stages: list[Stage] = []
    for name in recipe.stages:
        if name not in STAGE_BY_NAME:
            raise _fail(recipe, f"stages: unknown stage '{name}' (available: {', '.join(STAGE_BY_NAME)})")
        if name in (s.name for s in stages):
            raise _fail(recipe, f"stages: '{name}' is listed twice")
        stages.append(STAGE_BY_NAME[name](recipe))
    external = [type(o) for o in [source_outputs(recipe)] if o is not None]
    for index, stage in enumerate(stages):
        if stage.source_kind and stage.source_kind != recipe.source.kind:
            raise _fail(recipe, f"stages: '{stage.name}' needs source.kind '{stage.source_kind}'")
        earlier = [*external, *stages[:index]]
        for slot in input_slots(type(stage)):
            if not slot.optional and producer(slot, earlier) is None:
                raise _fail(recipe, f"stages: '{stage.name}' needs {_producer_names(slot)} before it")
    for index, stage in enumerate(stages if check else []):
        try:
            stage.check(stages[:index])
        except MissingInput as err:
            if missing is None:
                raise _fail(recipe, str(err)) from None
            missing.append(err)
        except ValueError as err:
            raise _fail(recipe, str(err)) from None
    return stages


def resolve_inputs(stage: Stage, done: Sequence[StageOutputs]) -> Any:
    """The stage's `Inputs`, each field the outputs of the latest earlier producer (or None)."""
    if not input_slots(type(stage)):
        return stage.Inputs()
    return stage.Inputs(**{slot.field: producer(slot, done) for slot in input_slots(type(stage))})


def counts_source(stage: Stage, done: Sequence[tuple[Stage, StageOutputs]]) -> Stage | None:
    """The earlier stage whose `kept` must equal this stage's `in` (None: no such rule)."""
    if stage.counts_from is None:
        return None
    slot = next(s for s in input_slots(type(stage)) if s.field == stage.counts_from)
    made = producer(slot, [outputs for _, outputs in done])
    return next((s for s, outputs in done if outputs is made), None)


def downstream(stages: Sequence[Stage], roots: set[str]) -> list[str]:
    """Names of `roots` and of every stage that reads, directly or not, what they made."""
    varying: set[str] = set()
    for index, stage in enumerate(stages):
        made_by = [producer(slot, stages[:index]) for slot in input_slots(type(stage))]
        if stage.name in roots or any(p is not None and p.name in varying for p in made_by):
            varying.add(stage.name)
    return [stage.name for stage in stages if stage.name in varying]


def pool_rows(recipe: Recipe, stages: Sequence[Stage]) -> int | None:
    """The pool size for estimates: the source stage's, `source.pool_size`, or a parquet's row count."""
    for stage in stages:
        if stage.source_kind:
            return stage.source_rows()
    if recipe.source.pool_size:
        return recipe.source.pool_size
    path = Path(recipe.source.path or "")
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows  # metadata only: touches no data
    return None


def plan_rows(recipe: Recipe, run_dir: Path, missing: list[MissingInput] | None = None) -> list[PlanRow]:
    stages = build_stages(recipe, missing=missing)
    rows = pool_rows(recipe, stages)
    plans = [(stage, stage.plan(run_dir, rows)) for stage in stages]
    return [row if row.resources else replace(row, resources=stage.resources().describe()) for stage, row in plans]


def budget_lines(recipe: Recipe) -> list[str]:
    """Compute and storage estimates for the plan (see pipeline.budget for the conventions)."""
    from pipeline.budget import human_bytes

    stages = build_stages(recipe, check=False)  # estimates need no model or head on disk
    lines = [line for stage in stages for line in stage.budget_lines()]
    rows = pool_rows(recipe, stages)
    storage = {kind: size for stage in stages for kind, size in stage.storage(rows).items()} if rows else {}
    if storage:
        parts = ", ".join(f"{kind} ~{human_bytes(size)}" for kind, size in storage.items())
        total = human_bytes(sum(storage.values()))
        lines.append(f"storage for {rows:,} samples: {parts} (total ~{total})")
    return lines
