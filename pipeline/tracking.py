"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The default store is a sqlite file under the output directory, so a fresh machine needs no
server; `MLFLOW_TRACKING_URI` or the recipe's `tracking.uri` point it at a real server instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import Recipe
from stages.manifest import Manifest

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def tracking_uri(recipe: Recipe, environ: Mapping[str, str]) -> str:
    if recipe.tracking.uri:
        return recipe.tracking.uri
    if environ.get("MLFLOW_TRACKING_URI"):
        return environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(recipe.output_dir).absolute() / 'mlflow.db'}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': 'value'} params, each within MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


def metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and space; map anything else to _."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def manifest_metrics(manifest: Manifest) -> dict[str, float]:
    metrics = {
        "in": float(manifest.in_count),
        "kept": float(manifest.kept),
        "dropped": float(manifest.n_dropped),
        "failed": float(manifest.n_failed),
        "seconds": manifest.seconds,
    }
    metrics.update({metric_key(f"dropped.{k}"): float(v) for k, v in manifest.dropped.items()})
    metrics.update({metric_key(f"failed.{k}"): float(v) for k, v in manifest.failed.items()})
    metrics.update({metric_key(k): float(v) for k, v in manifest.metrics.items()})
    return metrics


class Tracker:
    """Owns the MLflow parent run of one pipeline run."""

    def __init__(self, recipe: Recipe, environ: Mapping[str, str]):
        import mlflow

        self._mlflow = mlflow
        self.uri = tracking_uri(recipe, environ)
        self.experiment_name = recipe.tracking.experiment or recipe.name
        self.artifact_root = (Path(recipe.output_dir).absolute() / "mlartifacts").as_uri()
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            location = self.artifact_root if self.uri.startswith("sqlite:") else None
            self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id

    @contextmanager
    def parent_run(self, run_name: str, params: Mapping[str, Any], run_id: str | None) -> Iterator[str]:
        """Start (or reopen, on resume) the parent run; yield its id."""
        mlflow = self._mlflow
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                              experiment_id=self.experiment_id) as run:
            if run_id is None:
                mlflow.log_params(flatten(params))
            else:
                self._close_orphaned_children(run.info.run_id)
            yield run.info.run_id

    def _close_orphaned_children(self, parent_id: str) -> None:
        """Stage runs of a killed process stay RUNNING forever; mark them KILLED on resume."""
        orphans = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'",
        )
        for run in orphans:
            self.client.set_terminated(run.info.run_id, status="KILLED")

    @contextmanager
    def stage_run(self, stage: str, params: Mapping[str, Any]) -> Iterator[str]:
        mlflow = self._mlflow
        with mlflow.start_run(run_name=stage, nested=True, experiment_id=self.experiment_id) as run:
            mlflow.set_tag("stage", stage)
            if params:
                mlflow.log_params(flatten(params))
            yield run.info.run_id

    def log_manifest(self, manifest: Manifest, manifest_path: Path) -> None:
        self._mlflow.log_metrics(manifest_metrics(manifest))
        self._mlflow.log_artifact(str(manifest_path))
