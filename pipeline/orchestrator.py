"""Run a recipe's stages in order on Ray, check every manifest, record everything in MLflow.

A run lives in one directory: `run.json` (the resolved recipe and the MLflow run id) and one
folder per stage. A stage counts as finished when its `manifest.json` exists; `--resume` skips
those and lets unfinished stages skip their own finished shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.atomic import remove_partials, write_json, write_text
from pipeline.config import ConfigError, Recipe
from pipeline.runtime import ray_runtime
from pipeline.serve import serve_directory
from pipeline.stage_registry import STAGES, PlanRow, RunContext, StageSpec, validate_stages
from pipeline.tracking import Tracker, flatten
from stages.manifest import AccountingError, Manifest

RUN_FILE = "run.json"


@dataclass
class RunResult:
    run_dir: Path
    mlflow_run_id: str | None  # None when the tracking store could not be reached
    manifests: dict[str, Manifest]
    skipped: list[str]


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
            for r in (record["recipe"], recipe_record(recipe))
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


def write_run_record(run_dir: Path, record: dict) -> None:
    write_json(run_dir / RUN_FILE, record)


def check_manifest(spec: StageSpec, manifest: Manifest, ctx: RunContext) -> None:
    """The orchestrator's two accounting rules: a stage balances, and it got what upstream kept."""
    manifest.check_balance()
    upstream = spec.upstream(ctx.recipe)
    if upstream and upstream in ctx.manifests:
        expected = ctx.manifests[upstream].kept
        if manifest.in_count != expected:
            raise AccountingError(
                f"stage '{spec.name}' received {manifest.in_count} samples but '{upstream}' kept {expected}"
            )


@contextmanager
def demo_server(recipe: Recipe, run_dir: Path, ctx: RunContext) -> Iterator[None]:
    """Serve the demo pool on loopback for the whole run (same port again on resume)."""
    if recipe.source.kind != "demo" or "demo_pool" not in recipe.stages:
        yield
        return
    pool_dir = run_dir / "demo_pool"
    files_dir = pool_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    port = recipe.source.demo.port
    pool_record = pool_dir / "pool.json"
    if pool_record.exists():  # resume: URLs (and so uids) embed the port the pool was made with
        port = int(json.loads(pool_record.read_text())["base_url"].rsplit(":", 1)[1])
    with serve_directory(files_dir, port, recipe.source.demo.slow_seconds) as base_url:
        ctx.base_url = base_url
        yield


def run_pipeline(
    recipe: Recipe,
    *,
    run_name: str | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    map_fn_factory: Callable[[], object] | None = None,
    reuse: dict[str, Manifest] | None = None,
    parent_run_id: str | None = None,
) -> RunResult:
    """Run every stage of `recipe`; return the manifests. Raises on any accounting error.

    `reuse` holds finished stages of another run (a sweep's shared stages): they are taken as
    done. `parent_run_id` nests this run's MLflow run under another (a sweep's).
    """
    reuse = reuse or {}
    specs = validate_stages(recipe)
    run_dir = resolve_run_dir(recipe, run_name, resume)
    record = load_or_create_run(run_dir, recipe)
    tracker = Tracker(recipe, os.environ, warn=log)
    log(f"run directory: {run_dir}")
    log(f"MLflow: {tracker.uri} (experiment '{tracker.experiment_name}')")
    skipped: list[str] = []
    with ray_runtime(recipe.ray, log):
        from pipeline.executor import make_ray_map

        map_fn = map_fn_factory() if map_fn_factory else make_ray_map()
        ctx = RunContext(recipe=recipe, run_dir=run_dir, map_fn=map_fn, tracking_uri=tracker.uri)
        run_record = record["mlflow_run_id"]
        with tracker.parent_run(
            run_dir.name, recipe_record(recipe), run_record, parent_run_id, run_dir=run_dir
        ) as parent_id:
            record["mlflow_run_id"] = parent_id
            write_run_record(run_dir, record)
            with demo_server(recipe, run_dir, ctx) if "demo_pool" not in reuse else nullcontext():
                for spec in specs:
                    stage_dir = ctx.stage_dir(spec.name)
                    finished = reuse.get(spec.name) or Manifest.read(stage_dir)
                    if finished is not None:
                        ctx.manifests[spec.name] = finished
                        skipped.append(spec.name)
                        log(f"[{spec.name}] finished earlier, skipped: {finished.summary()}")
                        continue
                    log(f"[{spec.name}] {spec.summary}")
                    removed = remove_partials(stage_dir)  # what a killed earlier attempt was still writing
                    if removed:
                        log(f"[{spec.name}] removed {removed} partial file(s) left by an interrupted run")
                    with tracker.stage_run(parent_id, spec.name, spec.params(recipe)) as stage_run_id:
                        ctx.stage_run_id = stage_run_id
                        manifest = spec.run(ctx)
                        try:
                            check_manifest(spec, manifest, ctx)
                        except AccountingError:
                            write_text(
                                stage_dir / "manifest.rejected.json", manifest.model_dump_json(by_alias=True, indent=2)
                            )
                            raise
                        remove_partials(stage_dir)  # e.g. a retried task's abandoned shard
                        path = manifest.write(stage_dir)
                        tracker.log_manifest(stage_run_id, manifest, path)
                    ctx.manifests[spec.name] = manifest
                    log(f"[{spec.name}] {manifest.summary()}")
    if tracker.problem:  # `pipeline sync` reads this to know the folder holds what MLflow lacks
        record["mlflow_problem"] = tracker.problem
        write_run_record(run_dir, record)
        log(f"MLflow was unreachable ({tracker.problem}): run `python -m pipeline sync {run_dir}` when it is back")
    return RunResult(run_dir, record["mlflow_run_id"], ctx.manifests, skipped)


def plan(recipe: Recipe, run_name: str | None = None) -> tuple[Path, list[PlanRow]]:
    """The stage plan `--dry-run` prints; reads nothing but table metadata and creates nothing."""
    specs = validate_stages(recipe)
    run_dir = Path(recipe.output_dir) / (run_name or f"{recipe.name}-<timestamp>")
    return run_dir, [spec.plan(recipe, run_dir) for spec in specs]


__all__ = ["STAGES", "RunResult", "plan", "run_pipeline"]
