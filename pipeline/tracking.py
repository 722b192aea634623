"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The default store is a sqlite file under the output directory, so a fresh machine needs no
server; `MLFLOW_TRACKING_URI` or the recipe's `tracking.uri` point it at a real server instead.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import Recipe
from pipeline.manifest import Manifest
from stages.mlflow_sink import MlflowSink

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
RUN_DIR_TAG = "run_dir"  # the run folder every MLflow run of a pipeline run belongs to


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


ACCOUNTING = "accounting"  # MLflow's UI draws each `section/` prefix as its own group of charts


def manifest_metrics(manifest: Manifest) -> dict[str, float]:
    """A stage's manifest as MLflow metrics: the sample accounting under `accounting/` (apart from
    the curves), the stage's own figures under `<stage>/` (`evaluate/zeroshot_top1`)."""
    metrics = {
        f"{ACCOUNTING}/in": float(manifest.in_count),
        f"{ACCOUNTING}/kept": float(manifest.kept),
        f"{ACCOUNTING}/dropped": float(manifest.n_dropped),
        f"{ACCOUNTING}/failed": float(manifest.n_failed),
        f"{manifest.stage}/seconds": manifest.seconds,
    }
    metrics.update({metric_key(f"{ACCOUNTING}/dropped/{k}"): float(v) for k, v in manifest.dropped.items()})
    metrics.update({metric_key(f"{ACCOUNTING}/failed/{k}"): float(v) for k, v in manifest.failed.items()})
    metrics.update({metric_key(f"{manifest.stage}/{k}"): float(v) for k, v in manifest.metrics.items()})
    return metrics


# MLflow 3's UI opens an experiment by its kind: without this tag it may land on the GenAI
# "Overview" (traces, token usage) instead of the runs table and their charts.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class Tracker:
    """Owns the MLflow parent run of one pipeline run.

    Everything goes through one `MlflowClient` bound to one URI. MLflow's fluent API keeps global
    state (and `mlflow.set_tracking_uri` even rewrites MLFLOW_TRACKING_URI in os.environ), which
    would make a second run in the same process log into the first run's store.

    Logging is best effort (see `stages.mlflow_sink`): when the store cannot be reached, at the
    start or mid-run, the run goes on, run ids become None and `problem` says what happened.
    """

    def __init__(self, recipe: Recipe, environ: Mapping[str, str], warn: Callable[[str], None] | None = None):
        self.uri = tracking_uri(recipe, environ)
        self.experiment_name = recipe.tracking.experiment or recipe.name
        self.sink = MlflowSink(self.uri, warn)
        self.run_dir: str | None = None  # set by parent_run: tags every run of the pipeline run
        experiment = self.sink.call("get_experiment_by_name", self.experiment_name)
        if experiment is not None:
            self.experiment_id: str | None = experiment.experiment_id
        elif self.sink.online:
            # a local store keeps artifacts beside its database, not in ./mlruns of the cwd
            artifacts = (Path(recipe.output_dir).absolute() / "mlartifacts").as_uri()
            location = artifacts if self.uri.startswith("sqlite:") else None
            self.experiment_id = self.sink.call(
                "create_experiment", self.experiment_name, artifact_location=location, tags=EXPERIMENT_TAGS
            )
        else:
            self.experiment_id = None

    @property
    def problem(self) -> str | None:
        return self.sink.problem

    def describe(self) -> str:
        """One console line: the store, the experiment and, for a server, the link to its runs table.
        (MLflow 3.17's UI opens a fresh browser on its GenAI view unless the link asks for training runs.)"""
        where = f"MLflow: {self.uri} (experiment '{self.experiment_name}')"
        if self.uri.startswith(("http://", "https://")) and self.experiment_id is not None:
            link = f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
            return f"{where}: {link}"
        return where

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.sink.call(method, *args, **kwargs)

    def _create_run(self, run_name: str, tags: dict[str, str] | None) -> str | None:
        if self.experiment_id is None:
            return None
        run = self.call("create_run", self.experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id if run is not None else None

    @contextmanager
    def _run(self, run_id: str | None) -> Iterator[str | None]:
        """Mark the run FINISHED, FAILED or KILLED (Ctrl-C) when the block ends."""
        try:
            yield run_id
        except KeyboardInterrupt:
            if run_id:
                self.call("set_terminated", run_id, status="KILLED")
            raise
        except BaseException:
            if run_id:
                self.call("set_terminated", run_id, status="FAILED")
            raise
        if run_id:
            self.call("set_terminated", run_id, status="FINISHED")

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit for params
            self.call("log_batch", run_id, params=items[start : start + 100])

    @contextmanager
    def parent_run(
        self,
        run_name: str,
        params: Mapping[str, Any],
        run_id: str | None,
        nest_under: str | None = None,
        run_dir: Path | None = None,
    ) -> Iterator[str | None]:
        """Start (or reopen, on resume) the parent run; yield its id. `nest_under`: a sweep's run.

        Every run of a pipeline run is tagged with its folder, so that runs a killed process left
        RUNNING (even a parent it died before recording in run.json) are closed on resume.
        """
        self.run_dir = str(Path(run_dir).absolute()) if run_dir else None
        if run_id is None:
            tags = {"mlflow.parentRunId": nest_under} if nest_under else {}
            run_id = self._create_run(run_name, {**tags, **self._folder_tag()})
            if run_id:
                self._log_params(run_id, params)
        else:
            self.call("update_run", run_id, status="RUNNING")
            self._close_orphaned_children(run_id)
        self._close_stale_runs(keep=run_id)
        with self._run(run_id):
            yield run_id

    def _folder_tag(self) -> dict[str, str]:
        return {RUN_DIR_TAG: self.run_dir} if self.run_dir else {}

    def _close_stale_runs(self, keep: str | None) -> None:
        """Runs of this run folder still RUNNING from a killed process (even a parent it died before
        recording in run.json): mark them KILLED."""
        if self.run_dir and "'" not in self.run_dir:
            self._mark_killed(f"tags.{RUN_DIR_TAG} = '{self.run_dir}'", keep)

    def _close_orphaned_children(self, parent_id: str) -> None:
        """Stage runs of a killed process stay RUNNING forever; mark them KILLED on resume."""
        self._mark_killed(f"tags.mlflow.parentRunId = '{parent_id}'")

    def _mark_killed(self, clause: str, keep: str | None = None) -> None:
        if self.experiment_id is None:
            return
        running = self.call(
            "search_runs", [self.experiment_id], filter_string=f"{clause} and attributes.status = 'RUNNING'"
        )
        for run in running or []:
            if run.info.run_id != keep:
                self.call("set_terminated", run.info.run_id, status="KILLED")

    @contextmanager
    def stage_run(self, parent_id: str | None, stage: str, params: Mapping[str, Any]) -> Iterator[str | None]:
        tags = {"mlflow.parentRunId": parent_id, "stage": stage, **self._folder_tag()}
        run_id = self._create_run(stage, tags) if parent_id else None
        if run_id and params:
            self._log_params(run_id, params)
        with self._run(run_id):
            yield run_id

    def log_manifest(self, run_id: str | None, manifest: Manifest, manifest_path: Path) -> None:
        from mlflow.entities import Metric

        if not run_id:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in manifest_metrics(manifest).items()]
        self.call("log_batch", run_id, metrics=metrics)
        self.call("log_artifact", run_id, str(manifest_path))
        report = manifest.outputs.get("artifacts")  # a stage's report folder: plots, example grids
        if report:
            self.call("log_artifacts", run_id, report, "report")
