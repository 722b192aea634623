"""Replay a run folder into MLflow: for runs made while the tracking store was unreachable.

The folder is the record of truth: `run.json` holds the resolved recipe, each finished stage
its manifest (counts, metrics, report artifacts), training its per-step `train_log.jsonl` and
the final model. Sync creates a fresh parent run with a stage run per finished stage, exactly
as a live run would have logged them, and points `run.json` at it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from pipeline.graph import STAGE_BY_NAME
from pipeline.manifest import MANIFEST_NAME, Manifest
from pipeline.orchestrator import RUN_FILE, recipe_record, write_run_record
from pipeline.status import load_run_recipe
from pipeline.tracking import Tracker
from stages.train import TrainOutputs, curve_key


def _replay_training_log(tracker: Tracker, run_id: str, outputs: TrainOutputs) -> None:
    from mlflow.entities import Metric

    log_path = Path(outputs.log)
    if not log_path.is_file():
        return
    now = int(time.time() * 1000)
    metrics = []
    for line in log_path.read_text().splitlines():
        entry = json.loads(line)
        step = int(entry.pop("step"))
        wall = entry.pop("time", None)  # the step's own wall time (logs before it was recorded: now)
        stamp = int(wall * 1000) if isinstance(wall, int | float) else now
        metrics += [Metric(curve_key(k), float(v), stamp, step) for k, v in entry.items() if isinstance(v, int | float)]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit for metrics
        tracker.call("log_batch", run_id, metrics=metrics[start : start + 1000])
    model = Path(outputs.model)
    if model.is_dir():
        tracker.call("log_artifacts", run_id, str(model), "model")


def sync_run(
    run_dir: Path,
    tracking_uri: str | None = None,
    environ: Mapping[str, str] = os.environ,
    log: Callable[[str], None] = print,
) -> tuple[str, list[str]]:
    """(new parent run id, stages logged). Raises ConnectionError if the store is still unreachable."""
    recipe = load_run_recipe(run_dir)
    if tracking_uri:
        recipe = recipe.model_copy(update={"tracking": recipe.tracking.model_copy(update={"uri": tracking_uri})})
    tracker = Tracker(recipe, environ, warn=lambda message: None)
    record = json.loads((run_dir / RUN_FILE).read_text())
    logged: list[str] = []
    with tracker.parent_run(run_dir.name, recipe_record(recipe), None) as parent_id:
        for name in recipe.stages:
            stage = STAGE_BY_NAME[name](recipe)
            manifest = Manifest.read(run_dir / name)
            if manifest is None or parent_id is None:
                continue
            with tracker.stage_run(parent_id, name, stage.params()) as stage_run_id:
                tracker.log_manifest(stage_run_id, manifest, run_dir / name / MANIFEST_NAME)
                outputs = stage.Outputs.model_validate(manifest.outputs)
                if isinstance(outputs, TrainOutputs) and stage_run_id:  # its per-step curves and model
                    _replay_training_log(tracker, stage_run_id, outputs)
            logged.append(name)
    if tracker.problem or parent_id is None:
        raise ConnectionError(f"MLflow at {tracker.uri} is still unreachable ({tracker.problem})")
    record["mlflow_run_id"] = parent_id
    record.pop("mlflow_problem", None)
    write_run_record(run_dir, record)
    log(f"synced {run_dir} to MLflow run {parent_id} at {tracker.uri}: {', '.join(logged) or 'no finished stages'}")
    return parent_id, logged
