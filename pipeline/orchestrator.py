"""Run a recipe's stages in order on Ray, check every manifest, record everything in MLflow.

A run lives in one directory: `run.json` (the resolved recipe and the MLflow run id) and one
folder per stage. A stage counts as finished when its `manifest.json` exists; `--resume` skips
those and lets unfinished stages skip their own finished shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from rich.console import Console

from pipeline.atomic import remove_partials, write_json, write_text
from pipeline.config import ConfigError, Recipe, format_validation_error, source_outputs
from pipeline.graph import build_stages, counts_source, plan_rows, resolve_inputs
from pipeline.interrupts import ctrl_c_remembered, raise_if_interrupted
from pipeline.manifest import AccountingError, Manifest
from pipeline.metrics import record_stage
from pipeline.progress import driver_marker, step_progress
from pipeline.runtime import check_something_listens, ray_runtime
from pipeline.stage import MissingInput, PlanRow, RunContext, SourceOutputs, Stage, StageOutputs
from pipeline.terminal import after_ray_started, run_output
from pipeline.tracking import Tracker, flatten

T = TypeVar("T", bound=StageOutputs)

RUN_FILE = "run.json"


@dataclass
class RunResult:
    run_dir: Path
    mlflow_run_id: str | None  # None when the tracking store could not be reached
    manifests: dict[str, Manifest]
    skipped: list[str]
    outputs: dict[str, StageOutputs] = field(default_factory=dict)

    def output(self, kind: type[T]) -> T | None:
        """The outputs of the last stage that made `kind` (e.g. `EvaluateOutputs`)."""
        return next((o for o in reversed(self.outputs.values()) if isinstance(o, kind)), None)


def new_run_name(recipe: Recipe) -> str:
    return f"{recipe.name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def latest_run_dir(recipe: Recipe) -> Path | None:
    """The most recently created run of this recipe under its output_dir, whatever its folder name."""
    root = Path(recipe.output_dir)
    runs = []
    for record_path in root.glob(f"*/{RUN_FILE}") if root.exists() else []:
        record = json.loads(record_path.read_text())
        if record["recipe"]["name"] == recipe.name:
            runs.append((record["created"], record_path.parent.name, record_path.parent))
    return max(runs)[2] if runs else None


def resolve_run_dir(recipe: Recipe, run_name: str | None, resume: bool) -> Path:
    if run_name:
        if "/" in run_name or run_name in {".", ".."}:
            raise ConfigError(f"run name '{run_name}' must be a plain folder name")
        run_dir = Path(recipe.output_dir) / run_name
        if (run_dir / RUN_FILE).exists() and not resume:
            raise ConfigError(f"run '{run_dir}' already exists: pass --resume to continue it")
        if resume and not (run_dir / RUN_FILE).exists():
            raise ConfigError(f"cannot resume: no run at '{run_dir}'")
        return run_dir
    if resume:
        latest = latest_run_dir(recipe)
        if latest is None:
            raise ConfigError(f"cannot resume: no earlier run of '{recipe.name}' under '{recipe.output_dir}'")
        return latest
    return Path(recipe.output_dir) / new_run_name(recipe)


def recipe_record(recipe: Recipe) -> dict:
    return json.loads(recipe.model_dump_json())


def load_or_create_run(run_dir: Path, recipe: Recipe) -> dict:
    """Read run.json on resume (the recipe must be the same) or write a new one."""
    path = run_dir / RUN_FILE
    if path.exists():
        record = json.loads(path.read_text())
        # output_dir is where the run lives, not what it computes: a moved run folder may resume
        before, now = (
            {k: v for k, v in flatten(r).items() if k != "output_dir"}
            for r in (_as_read_now(record["recipe"], run_dir), recipe_record(recipe))
        )
        if before != now:
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise ConfigError(
                f"cannot resume '{run_dir}': the recipe changed ({', '.join(changed[:8])}); start a new run instead"
            )
        return record
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run directory '{run_dir}': {err.strerror}") from None
    record = {
        "recipe": recipe_record(recipe),
        "mlflow_run_id": None,
        "created": datetime.now(UTC).isoformat(timespec="microseconds"),
    }
    write_run_record(run_dir, record)
    return record


# top-level recipe keys earlier versions wrote to run.json and no stage read (`seed`)
RETIRED_KEYS = frozenset({"seed"})


def _as_read_now(stored: dict, run_dir: Path) -> dict:
    """A stored recipe as this version reads it: renamed values, new defaults and keys that nothing
    reads any more (RETIRED_KEYS) are not changes."""
    try:
        return recipe_record(Recipe.model_validate({k: v for k, v in stored.items() if k not in RETIRED_KEYS}))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(run_dir / RUN_FILE))) from None


def write_run_record(run_dir: Path, record: dict) -> None:
    write_json(run_dir / RUN_FILE, record)


def check_manifest(stage: Stage, manifest: Manifest, upstream: tuple[Stage, Manifest] | None) -> None:
    """The orchestrator's two accounting rules: a stage balances, and it got what upstream kept."""
    manifest.check_balance()
    if upstream is not None:
        source, made = upstream
        if manifest.in_count != made.kept:
            raise AccountingError(
                f"stage '{stage.name}' received {manifest.in_count} samples but '{source.name}' kept {made.kept}"
            )


@dataclass
class _Done:
    """The stages finished so far in this run, in order, with what each made."""

    stages: list[Stage] = field(default_factory=list)
    outputs: list[StageOutputs] = field(default_factory=list)
    manifests: dict[str, Manifest] = field(default_factory=dict)

    def add(self, stage: Stage, outputs: StageOutputs, manifest: Manifest) -> None:
        self.stages.append(stage)
        self.outputs.append(outputs)
        self.manifests[stage.name] = manifest

    def upstream(self, stage: Stage) -> tuple[Stage, Manifest] | None:
        source = counts_source(stage, list(zip(self.stages, self.outputs, strict=True)))
        return (source, self.manifests[source.name]) if source is not None else None

    def quality(self, outputs: StageOutputs) -> dict[str, float]:
        """What every source among the finished stages says of these outputs (ground-truth scores)."""
        scores: dict[str, float] = {}
        for made in self.outputs:
            if isinstance(made, SourceOutputs):
                scores.update(made.quality(outputs))
        return scores


def _finished(stage: Stage, stage_dir: Path, reuse: dict[str, Manifest]) -> tuple[StageOutputs, Manifest] | None:
    manifest = reuse.get(stage.name) or Manifest.read(stage_dir)
    if manifest is None:
        return None
    return stage.finished(manifest)


def _run_stage(stage: Stage, ctx: RunContext, done: _Done, tracker: Tracker, parent_id: str | None, log) -> None:
    stage_dir = stage.stage_dir(ctx)
    if ctx.progress_console is None:  # a quiet run shows one line per stage: its result (and a live bar)
        log(f"[{stage.name}] {stage.summary}")
    removed = remove_partials(stage_dir)  # what a killed earlier attempt was still writing
    if removed:
        log(f"[{stage.name}] removed {removed} partial file(s) left by an interrupted run")
    with tracker.stage_run(parent_id, stage.name, stage.params()) as stage_run_id:
        ctx.stage_run_id = stage_run_id
        upstream = done.upstream(stage)
        ctx.upstream_kept = upstream[1].kept if upstream else None
        inputs = resolve_inputs(stage, [*ctx_sources(stage.recipe), *done.outputs])
        with step_progress(stage_dir, ctx.progress_console, stage.name):
            outputs, manifest = stage.run(ctx, inputs)
        manifest.outputs = outputs.as_dict()
        manifest.metrics.update(done.quality(outputs))
        try:
            check_manifest(stage, manifest, upstream)
        except AccountingError:
            write_text(stage_dir / "manifest.rejected.json", manifest.model_dump_json(by_alias=True, indent=2))
            raise
        remove_partials(stage_dir)  # e.g. a retried task's abandoned shard
        path = manifest.write(stage_dir)
        tracker.log_manifest(stage_run_id, manifest, path)
        record_stage(manifest)  # Prometheus, through Ray's metrics agent
    done.add(stage, outputs, manifest)
    log(f"[{stage.name}] {manifest.summary()}")


def ctx_sources(recipe: Recipe) -> list[StageOutputs]:
    """Outputs a run has before any stage: a table source's table."""
    made = source_outputs(recipe)
    return [made] if made is not None else []


def run_pipeline(
    recipe: Recipe,
    *,
    run_name: str | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    map_fn_factory: Callable[[], object] | None = None,
    reuse: dict[str, Manifest] | None = None,
    parent_run_id: str | None = None,
    consoles: Sequence[Console] | None = None,
) -> RunResult:
    """Run every stage of `recipe`; return the manifests. Raises on any accounting error.

    `reuse` holds finished stages of another run (a sweep's shared stages): they are taken as
    done. `parent_run_id` nests this run's MLflow run under another (a sweep's). Given `consoles`
    (the CLI's), the run is quiet: only they reach the terminal, all else goes to `<run>/logs/`.
    """
    reuse = reuse or {}
    stages = build_stages(recipe)
    if recipe.ray.address:
        check_something_listens(recipe.ray.address)  # before a run folder is made for a mistyped address
    run_dir = resolve_run_dir(recipe, run_name, resume)
    record = load_or_create_run(run_dir, recipe)
    log(f"run directory: {run_dir}")
    skipped: list[str] = []
    done = _Done()
    quiet = consoles is not None
    with ExitStack() as scope:
        for context in (ctrl_c_remembered(), driver_marker(run_dir), run_output(run_dir, consoles, log)):
            scope.enter_context(context)
        tracker = Tracker(recipe, os.environ, warn=log)  # after `run_output`: MLflow's own lines go to the log
        log(tracker.describe())
        scope.enter_context(ray_runtime(recipe.ray, log, log_to_driver=not quiet))
        from pipeline.executor import make_ray_map

        after_ray_started(run_dir, quiet)
        bars = consoles[-1] if quiet else None  # progress bars on the terminal's stderr
        map_fn = (
            map_fn_factory()
            if map_fn_factory
            else make_ray_map(console=bars, max_in_flight=recipe.ray.max_tasks_in_flight, progress_dir=run_dir)
        )
        ctx = RunContext(run_dir=run_dir, map_fn=map_fn, tracking_uri=tracker.uri, log=log, progress_console=bars)
        run_record = record["mlflow_run_id"]
        with (
            tracker.parent_run(
                run_dir.name, recipe_record(recipe), run_record, parent_run_id, run_dir=run_dir
            ) as parent_id,
            ExitStack() as serving,
        ):
            record["mlflow_run_id"] = parent_id
            write_run_record(run_dir, record)
            for stage in stages:
                if stage.name not in reuse:  # a reused source's server belongs to the run that made it
                    serving.enter_context(stage.serving(ctx))
            for stage in stages:
                raise_if_interrupted()  # a Ctrl-C a finalizer swallowed during the last stage stops here
                finished = _finished(stage, stage.stage_dir(ctx), reuse)
                if finished is not None:
                    done.add(stage, *finished)
                    skipped.append(stage.name)
                    log(f"[{stage.name}] finished earlier, skipped: {finished[1].summary()}")
                    continue
                _run_stage(stage, ctx, done, tracker, parent_id, log)
            raise_if_interrupted()
    if tracker.problem:  # `pipeline sync` reads this to know the folder holds what MLflow lacks
        record["mlflow_problem"] = tracker.problem
        write_run_record(run_dir, record)
        log(f"MLflow was unreachable ({tracker.problem}): run `python -m pipeline sync {run_dir}` when it is back")
    return RunResult(
        run_dir, record["mlflow_run_id"], done.manifests, skipped, dict(zip(recipe.stages, done.outputs, strict=True))
    )


def plan(
    recipe: Recipe, run_name: str | None = None, missing: list[MissingInput] | None = None
) -> tuple[Path, list[PlanRow]]:
    """The stage plan `--dry-run` prints; reads nothing but table metadata and creates nothing.
    With a `missing` list, inputs not there yet are collected in it instead of stopping the plan."""
    run_dir = Path(recipe.output_dir) / (run_name or f"{recipe.name}-<timestamp>")
    source = recipe.source.path
    if missing is not None and source and "://" not in source and not Path(source).exists():
        missing.append(MissingInput(f"source.path: not found: {source}", "source.path"))
    return run_dir, plan_rows(recipe, run_dir, missing)


__all__ = ["RunResult", "plan", "run_pipeline"]
