"""Sweeps: one pool, several filter strategies, the same training compute, one results table.

A sweep names a base recipe and a set of strategies. The stages above the strategy (download,
hashes, seed models, embeddings, heads) run once, in a `shared` run (once per pool seed with
`pool_seed_key`); each strategy then runs filter → train → evaluate with those stages reused,
training from the shared shards through its kept-uid mask, and the training budget (model,
samples seen, batch, seed) of the base recipe unchanged, so strategies differ only in their
data. The plan (recipes, trials, slots, the dry run) is `pipeline.sweep_plan`. A strategy trained
with `seeds` training seeds is that many *trials*; trials run as Ray tasks, as many at once as
the cluster holds their training (`concurrent_trials`), each in its own worker process with its
own run folder, so a killed sweep resumes with its finished trials kept. MLflow:
one sweep run, a child run per trial (and for the shared stages), each with its stage runs below
it; the sweep run holds the results table (mean ± std per strategy) and the accuracy-vs-kept plot.
A strategy may leave filter parameters open (`pipeline.sweep_search`: each setting becomes a
strategy), and `early_stopping` stops trials whose zero-shot curve falls behind (`stages.train.early_stop`).

Why Ray tasks and not Ray Tune: a trial is a whole pipeline run whose training is itself a Ray Train
run that asks the cluster for its own workers; a task with no resources of its own is all a trial's
driver needs, and the trials' training queues for the cluster's CPUs/GPUs like any Ray Train run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import yaml

from pipeline.atomic import write_json, write_text
from pipeline.config import ConfigError, Recipe
from pipeline.orchestrator import RunResult, run_pipeline
from pipeline.runtime import ray_runtime
from pipeline.sweep_config import SweepConfig, apply_sweep_overrides
from pipeline.sweep_plan import (
    Trial,
    shared_runs,
    sweep_plan,
    sweep_recipes,
    sweep_trials,
    trial_slots,
    with_early_stop,
)
from pipeline.sweep_table import StrategyRow, StrategySummary, summarise, write_table
from pipeline.terminal import run_output
from pipeline.tracking import Tracker, metric_key
from stages.evaluate import EvaluateOutputs
from stages.filter import Filter
from stages.subset import Subset
from stages.train import Train

__all__ = ["run_sweep", "sweep_plan", "sweep_recipes", "sweep_trials"]  # the plan's, for the CLI and tests


def run_trial(trial: Trial, sweep_dir: str, reuse: dict, parent_run_id: str | None) -> StrategyRow:
    """One trial, in a Ray worker of its own: resumed if its folder exists, its console in `trials/<name>.log`."""
    started = time.time()
    folder = Path(sweep_dir)
    (folder / "trials").mkdir(exist_ok=True)
    with open(folder / "trials" / f"{trial.name}.log", "a") as handle:

        def log(line: str) -> None:
            handle.write(line + "\n")
            handle.flush()

        again = (folder / trial.name / "run.json").exists()
        result = run_pipeline(
            trial.recipe, run_name=trial.name, resume=again, log=log, reuse=reuse, parent_run_id=parent_run_id
        )
    row = result_row(trial.strategy, result)
    row.seed, row.started, row.ended = trial.seed, started, time.time()
    return row


def best_strategy(summaries: list[StrategySummary]) -> StrategySummary:
    """The strategy with the best mean zero-shot top-1 among those with a trial trained to the end."""
    finished = [s for s in summaries if s.seeds] or summaries  # trials stopped early had less compute
    return max(finished, key=lambda s: s.metrics["zeroshot_top1"].mean)


def write_best_recipe(best: StrategySummary, recipe: Recipe, path: Path) -> Path:
    """The best strategy's recipe (with the base recipe's stages, its subset too), ready for `pipeline run`
    at a larger scale (its output folder and tracking store are left to that run's defaults)."""
    recipe = recipe.model_dump(mode="json", exclude={"output_dir", "tracking"})
    recipe["description"] = f"best strategy of a sweep: {best.strategy}"
    header = (
        f"# '{best.strategy}': zero-shot top-1 {best.metrics['zeroshot_top1']} over {best.seeds} seed(s), "
        f"kept fraction {best.kept_fraction:.3f}\n"
    )
    write_text(path, header + yaml.safe_dump(recipe, sort_keys=False))
    return path


def materialise(recipe: Recipe, shared: Recipe, runs_root: dict, reuse: dict, parent: str | None, log, consoles):
    """The best strategy's filtered copy of the pool: its filter and subset, in the sweep's `best` run."""
    best = recipe.model_copy(update={**runs_root, "stages": [*shared.stages, Filter.name, Subset.name]})
    log("--- best: its filtered copy of the pool ---")
    again = (Path(runs_root["output_dir"]) / "best" / "run.json").exists()
    return run_pipeline(
        best, run_name="best", resume=again, log=log, reuse=reuse, parent_run_id=parent, consoles=consoles
    )


def result_row(strategy: str, result: RunResult) -> StrategyRow:
    scores = json.loads(Path(result.output(EvaluateOutputs).results).read_text())
    filtered = result.manifests[Filter.name]
    return StrategyRow(
        strategy,
        filtered.kept,
        filtered.in_count,
        scores.get("zeroshot_top1", float("nan")),
        scores.get("zeroshot_top5", float("nan")),
        scores.get("image_to_text_recall_at_1", float("nan")),
        scores.get("text_to_image_recall_at_1", float("nan")),
        stopped_at_step=int(result.manifests[Train.name].metrics.get("stopped_early_at_step", 0)),
    )


def latest_sweep_dir(output_dir: Path, name: str) -> Path | None:
    found = sorted(output_dir.glob(f"{name}-*/sweep.json")) if output_dir.exists() else []
    return found[-1].parent if found else None


def run_sweep(
    sweep: SweepConfig,
    overrides: list[str] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    consoles=None,
) -> tuple[Path, list[StrategyRow]]:
    """Shared stages once (or once per pool seed), then the trials, several at once; `consoles`: quiet
    runs (see `run_pipeline`).
    Returns the sweep folder and a row per trial."""
    from pipeline.executor import make_ray_map

    sweep, overrides = apply_sweep_overrides(sweep, overrides or [])
    shared, per_strategy = sweep_recipes(sweep, overrides)
    root = Path(shared.output_dir).absolute()  # the trials run in Ray workers, whose working directory may differ
    sweep_dir = latest_sweep_dir(root, sweep.name) if resume else None
    if resume and sweep_dir is None:
        raise ConfigError(f"cannot resume: no earlier sweep '{sweep.name}' under '{root}'")
    if sweep_dir is None:
        sweep_dir = root / f"{sweep.name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        sweep_dir.mkdir(parents=True)
        write_json(sweep_dir / "sweep.json", {"sweep": sweep.model_dump(mode="json"), "mlflow_run_id": None})
    record = json.loads((sweep_dir / "sweep.json").read_text())
    tracker = Tracker(shared, os.environ, warn=log)
    log(f"sweep directory: {sweep_dir}")
    with (
        run_output(sweep_dir, consoles, log),  # a quiet sweep: Ray's start-up lines go to <sweep>/logs too
        ray_runtime(shared.ray, log, log_to_driver=consoles is None),
        tracker.parent_run(sweep_dir.name, sweep.model_dump(mode="json"), record["mlflow_run_id"]) as sweep_run,
    ):
        record["mlflow_run_id"] = sweep_run
        write_json(sweep_dir / "sweep.json", record)
        # every run of the sweep lives in its folder and logs to the sweep's MLflow store
        runs_root = {"output_dir": str(sweep_dir), "tracking": shared.tracking.model_copy(update={"uri": tracker.uri})}
        reuse = []  # the manifests of each shared run (one per pool seed with `pool_seed_key`)
        for name, recipe in shared_runs(sweep, shared):
            log(f"--- {name} ---")
            again = (sweep_dir / name / "run.json").exists()
            reuse.append(run_pipeline(
                recipe.model_copy(update=runs_root), run_name=name, resume=again, log=log,
                parent_run_id=sweep_run, consoles=consoles,
            ).manifests)  # fmt: skip
        trials = [
            replace(t, recipe=with_early_stop(t.recipe.model_copy(update=runs_root), sweep, t.name))
            for t in sweep_trials(sweep, per_strategy)
        ]
        slots = trial_slots(sweep, trials[0].recipe, len(trials))
        log(f"--- {len(trials)} trials, {slots} at a time (consoles in {sweep_dir / 'trials'}) ---")
        folder = str(sweep_dir)

        def trial_task(trial: Trial) -> StrategyRow:
            return run_trial(trial, folder, reuse[trial.pool], sweep_run)

        bars = consoles[-1] if consoles else None
        ray_map = make_ray_map(max_retries=1, num_cpus=0, console=bars, max_in_flight=slots, progress_dir=sweep_dir)
        rows = ray_map(trial_task, trials, desc="trials")
        for trial, row in zip(trials, rows, strict=True):
            stopped = f" (stopped early at step {row.stopped_at_step})" if row.stopped_at_step else ""
            log(f"[{trial.name}] kept {row.kept}/{row.pool}, zero-shot top-1 {row.zeroshot_top1:.3f}{stopped}")
        summaries = summarise(rows)
        best = best_strategy(summaries)
        paths = write_table(rows, summaries, sweep_dir / "results")
        paths.append(write_best_recipe(best, per_strategy[best.strategy], sweep_dir / "results" / "best_recipe.yaml"))
        if sweep.materialise_best:
            materialise(per_strategy[best.strategy], shared, runs_root, reuse[0], sweep_run, log, consoles)
        for path in paths if sweep_run else []:
            tracker.call("log_artifact", sweep_run, str(path), "results")
        for summary in summaries if sweep_run else []:
            metrics = {"kept_fraction": summary.kept_fraction}
            for key, name in (("zeroshot_top1", "zeroshot_top1"), ("image_to_text_r1", "image_to_text_R1")):
                metrics[name] = summary.metrics[key].mean
                metrics[f"{name}_std"] = summary.metrics[key].std
            for key, value in metrics.items():
                tracker.call("log_metric", sweep_run, metric_key(f"{summary.strategy}/{key}"), value)
    return sweep_dir, rows
