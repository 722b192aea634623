"""The stage contract: what a stage declares, so the orchestrator can wire, check and plan it.

A stage is one module in `stages/` holding a `Stage` subclass. It declares:
- `name` and `summary`; its config section of the recipe (`config_model`, read by `config`);
- `Inputs`: a dataclass whose fields are typed with other stages' outputs. The field's type *is*
  the edge: the orchestrator hands each field the outputs of the latest earlier stage whose
  `Outputs` is that type (or a subclass); `X | None` makes the input optional;
- `Outputs`: a pydantic model of the paths it writes, stored as its manifest's `outputs`;
- `counts_from`: the input whose `kept` must equal this stage's `in` (the accounting edge);
- the columns it adds to the per-uid table that filters read, its resources, `plan` and `run`.

Like NeMo Curator's `ProcessingStage` (inputs/outputs/resources) and Ray Data's logical operators
(explicit input edges), but a stage returns a `Manifest` that accounts for every sample it got:
`in == kept + dropped(reason) + failed(reason)`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from pipeline.manifest import Manifest
from pipeline.mapping import MapFn, local_map


class StageOutputs(BaseModel):
    """Typed paths a stage hands to later stages; stored as strings in `manifest.json`."""

    model_config = ConfigDict(extra="forbid")

    artifacts: str | None = None  # a report folder (plots, example grids) logged to MLflow

    def as_dict(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.model_dump().items() if value is not None}


class Shards(StageOutputs):
    """Webdataset tars with a parquet beside each (download, subset)."""

    shards_dir: str
    n_shards: str | None = None
    applied: str | None = None  # the decisions these shards were cut by (a subset's); training masks no further


class Decisions(StageOutputs):
    """A keep/reason verdict per uid (uid, keep, reason): a folder of one parquet per shard (dedupe,
    filter) or one parquet (prefilter); `stages.shards.read_decisions` reads either."""

    decisions: str


class SourceOutputs(StageOutputs):
    """The url/caption table a run downloads, and what a source may also provide."""

    table: str
    metadata: str = "auto"  # the table's schema (stages.metadata_schema): auto, laion, datacomp, plain
    url_col: str | None = None  # None: the schema's
    caption_col: str | None = None
    labels: str | None = None  # labelled uids: default for seed_models.labels and heads.labels
    eval_dir: str | None = None  # held-out set: default for evaluation, always removed from training

    gives_labels: ClassVar[bool] = False  # known before a run, so a recipe can be checked
    gives_eval_set: ClassVar[bool] = False

    def quality(self, outputs: StageOutputs) -> dict[str, float]:
        """Metrics scoring a later stage's outputs against what this source knows (its ground truth)."""
        return {}


@dataclass(frozen=True)
class Resources:
    """What one unit of a stage's work asks of the cluster (Ray task or actor)."""

    cpus: float = 1.0
    gpus: float = 0.0
    actors: int | None = None  # a fixed pool of actors; None: one task per shard

    def describe(self) -> str:
        each = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        return f"{self.actors} x ({each})" if self.actors else f"{each} per task"


@dataclass(frozen=True)
class PlanRow:
    stage: str
    input: str
    output: str
    estimated_in: int | None
    note: str = ""
    resources: str = ""


@dataclass
class RunContext:
    """What a running stage may use besides its inputs: where to write and how to fan out."""

    run_dir: Path
    map_fn: MapFn = local_map
    tracking_uri: str | None = None
    stage_run_id: str | None = None  # the MLflow run of the stage being run
    log: Callable[[str], None] = print
    upstream_kept: int | None = None  # `kept` of the stage this one counts from (see `counts_from`)
    progress_console: Any = None  # a quiet run's terminal (rich Console) for live progress lines


def earlier_source(before: list[Stage]) -> type[SourceOutputs] | None:
    """The outputs type of the source stage among `before` (None: the source is a plain table)."""
    return next((s.Outputs for s in reversed(before) if issubclass(s.Outputs, SourceOutputs)), None)


class MissingInput(ValueError):
    """A file or model the recipe needs is not there (yet): a run stops on it in one line, a dry run
    lists it with the `--set` that provides it."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting


def check_labels(stage: Stage, labels: str | None, before: list[Stage]) -> None:
    """A stage that fits on labelled uids has them: its own `labels` file, or the source's."""
    if labels and not Path(labels).exists():
        raise MissingInput(f"{stage.name}.labels: not found: {labels}", f"{stage.name}.labels")
    source = earlier_source(before)
    if not labels and not (source and source.gives_labels):
        raise MissingInput(
            f"{stage.name}.labels is needed (a parquet of labelled uids): the source has none", f"{stage.name}.labels"
        )


class NoInputs:
    """Inputs of a stage that reads nothing from earlier stages."""


class Stage:
    """Base of every stage; one instance per run, built from the recipe."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Inputs: ClassVar[type] = NoInputs
    Outputs: ClassVar[type[StageOutputs]] = StageOutputs
    counts_from: ClassVar[str | None] = None
    config_model: ClassVar[type[BaseModel] | None] = None  # the recipe section named after the stage
    source_kind: ClassVar[str | None] = None  # set by a stage that *is* a source (`source.kind`)

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe

    @property
    def config(self) -> Any:
        """This stage's section of the recipe (None for a stage without settings)."""
        if self.config_model is None:
            return None
        if self.source_kind:
            return getattr(self.recipe.source, self.source_kind)
        return getattr(self.recipe, self.name)

    def params(self) -> dict[str, Any]:
        """What MLflow records for this stage."""
        return self.config.model_dump() if isinstance(self.config, BaseModel) else {}

    def stage_dir(self, ctx: RunContext) -> Path:
        return ctx.run_dir / self.name

    def check(self, before: list[Stage]) -> None:
        """Raise ValueError (one line) if this recipe cannot run this stage; `before` ran earlier."""

    def columns(self, before: list[Stage]) -> tuple[str, ...]:
        """Columns this stage adds to the per-uid table filters read (`before`: earlier stages)."""
        return ()

    def column_hints(self) -> dict[str, str]:
        """How a recipe gets each column this stage can add (for 'filter X needs column Y')."""
        return {column: f"run the {self.name} stage" for column in self.columns([])}

    def source_rows(self) -> int | None:
        """A source stage's pool size, for estimates."""
        return None

    def storage(self, rows: int) -> dict[str, float]:
        """Estimated bytes this stage writes for a pool of `rows`, by kind (for the dry-run plan)."""
        return {}

    def budget_lines(self) -> list[str]:
        """Extra dry-run lines (e.g. training compute)."""
        return []

    def serving(self, ctx: RunContext) -> AbstractContextManager[None]:
        """A context the whole run happens inside (e.g. a source's loopback file server)."""
        return nullcontext()

    def resources(self) -> Resources:
        return Resources()

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        """The `--dry-run` line; `rows` is the estimated size of the pool."""
        return PlanRow(self.name, "", str(run_dir / self.name), None)

    def run(self, ctx: RunContext, inputs: Any) -> tuple[StageOutputs, Manifest]:
        raise NotImplementedError

    def finished(self, manifest: Manifest) -> tuple[StageOutputs, Manifest]:
        """(typed outputs, manifest) of a manifest this stage wrote, now or in an earlier run."""
        return self.Outputs.model_validate(manifest.outputs), manifest


@dataclass(frozen=True)
class InputSlot:
    """One declared input: the outputs type it takes and whether it may be absent."""

    field: str
    kind: type[StageOutputs]
    optional: bool


def input_slots(stage: type[Stage]) -> list[InputSlot]:
    if stage.Inputs is NoInputs:
        return []
    hints = typing.get_type_hints(stage.Inputs)
    slots = []
    for item in dataclasses.fields(stage.Inputs):
        hint = hints[item.name]
        args = (
            typing.get_args(hint)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            else ()
        )
        kinds = [a for a in args if a is not type(None)] or [hint]
        slots.append(InputSlot(item.name, kinds[0], optional=type(None) in args))
    return slots


def _gives(item: Any) -> type:
    if isinstance(item, Stage):
        return item.Outputs
    return item if isinstance(item, type) else type(item)


def producer(slot: InputSlot, earlier: Sequence[Any]) -> Any | None:
    """The latest of `earlier` (stages, outputs types or outputs) that gives what `slot` takes."""
    for item in reversed(earlier):
        if issubclass(_gives(item), slot.kind):
            return item
    return None
