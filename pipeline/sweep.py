"""Sweeps: one pool, several filter strategies, the same training compute, one results table.

A sweep names a base recipe and a set of strategies. The stages above the strategy (download,
hashes, seed models, embeddings, heads) run once, in a `shared` run; each strategy then runs
filter → subset → train → evaluate with those stages reused, and the training budget (model,
samples seen, batch, seed) of the base recipe unchanged, so strategies differ only in their
data. A strategy trained with `seeds` training seeds is that many *trials*; trials run as Ray tasks,
as many at once as the cluster holds their training (`concurrent_trials`), each in its own worker
process with its own run folder, so a killed sweep resumes with its finished trials kept. MLflow:
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from pipeline.atomic import write_json, write_text
from pipeline.config import ConfigError, Recipe, load_recipe
from pipeline.graph import build_stages, downstream
from pipeline.orchestrator import RunResult, run_pipeline
from pipeline.runtime import ray_runtime
from pipeline.stage import Resources
from pipeline.sweep_config import SweepConfig, apply_sweep_overrides, settled_strategies
from pipeline.sweep_table import StrategyRow, StrategySummary, summarise, write_table
from pipeline.terminal import run_output
from pipeline.tracking import Tracker, metric_key
from stages.evaluate import Evaluate, EvaluateOutputs
from stages.filter import Filter
from stages.subset import Subset
from stages.train import Train
from stages.train.early_stop import EarlyStopConfig


@dataclass(frozen=True)
class Trial:
    """One strategy trained with one seed: a run folder of its own under the sweep's."""

    name: str
    strategy: str
    seed: int
    recipe: Recipe


def sweep_recipes(sweep: SweepConfig, overrides: list[str]) -> tuple[Recipe, dict[str, Recipe]]:
    """(the shared-stages recipe, one recipe per strategy); all validated before anything runs."""
    base = load_recipe(sweep.recipe, [*sweep.overrides, *overrides, f"tracking.experiment={sweep.name}"])
    missing = [s.name for s in (Filter, Train, Evaluate) if s.name not in base.stages]
    if missing:
        raise ConfigError(f"sweep '{sweep.name}': the base recipe's stages lack {', '.join(missing)}")
    if sweep.early_stopping and not base.train.zeroshot_frequency:
        raise ConfigError(
            f"sweep '{sweep.name}': early_stopping reads the zero-shot curve: set train.zeroshot_frequency"
        )
    if sweep.materialise_best and Subset.name not in base.stages:
        raise ConfigError(f"sweep '{sweep.name}': materialise_best writes a subset, but the base recipe has no subset")
    varying = downstream(build_stages(base, check=False), {Filter.name})  # the strategy's stage and all that read it
    shared = base.model_copy(update={"stages": [s for s in base.stages if s not in varying]})
    per_strategy = {}
    for name, steps in settled_strategies(sweep)[0].items():
        recipe = base.model_copy(update={Filter.name: base.filter.model_copy(update={"strategy": steps})})
        build_stages(recipe)  # a strategy that cannot run fails here, before the shared stages start
        per_strategy[name] = recipe
    return shared, per_strategy


def sweep_trials(sweep: SweepConfig, per_strategy: dict[str, Recipe]) -> list[Trial]:
    """Seed by seed, every strategy: with fewer slots than trials, each strategy gets its first seed first.
    A trial writes no copy of the pool (unless `trial_subsets`): its training applies the strategy's
    decisions to the shared shards as a kept-uid mask (`stages.train.kept_mask`)."""
    trials = []
    for k in range(sweep.seeds):
        for strategy, recipe in per_strategy.items():
            seed = recipe.train.seed + k
            name = strategy if sweep.seeds == 1 else f"{strategy}-seed{seed}"
            update = {Train.name: recipe.train.model_copy(update={"seed": seed})}
            if not sweep.trial_subsets:
                update["stages"] = [s for s in recipe.stages if s != Subset.name]
            trials.append(Trial(name, strategy, seed, recipe.model_copy(update=update)))
    return trials


def with_early_stop(recipe: Recipe, sweep: SweepConfig, trial: str) -> Recipe:
    """The trial's recipe with the sweep's early stopping handed to its training (the board is the sweep's)."""
    if sweep.early_stopping is None:
        return recipe
    board = str(Path(recipe.output_dir) / "early_stop")
    stop = EarlyStopConfig(board=board, trial=trial, **sweep.early_stopping.model_dump())
    return recipe.model_copy(update={Train.name: recipe.train.model_copy(update={"early_stop": stop})})


def training_resources(recipe: Recipe) -> Resources:
    """What one trial's training asks of the cluster: the train stage's own declaration."""
    return next(stage for stage in build_stages(recipe, check=False) if stage.name == Train.name).resources()


def trial_slots(sweep: SweepConfig, recipe: Recipe, n_trials: int) -> int:
    """How many trials run at once: as asked, or as many as the cluster holds their training."""
    if sweep.concurrent_trials:
        return min(sweep.concurrent_trials, n_trials)
    import ray

    total, need = ray.cluster_resources(), training_resources(recipe)
    slots = total.get("CPU", 1.0) // (need.actors * need.cpus)
    if need.gpus:
        slots = min(slots, total.get("GPU", 0.0) // (need.actors * need.gpus))
    return int(max(1, min(slots, n_trials)))


def sweep_plan(sweep: SweepConfig, overrides: list[str]) -> list[str]:
    """What `pipeline sweep --dry-run` prints: the trials, each one's resources, how many run at once,
    and the training budget in all. Validates everything; starts nothing."""
    sweep, overrides = apply_sweep_overrides(sweep, overrides)
    shared, per_strategy = sweep_recipes(sweep, overrides)
    trials = sweep_trials(sweep, per_strategy)
    train, need = shared.train, training_resources(trials[0].recipe)
    gpus = f" and {need.actors * need.gpus:g} GPU(s)" if need.gpus else ""
    masked = Subset.name in per_strategy[trials[0].strategy].stages and not sweep.trial_subsets
    mask_note = " (training reads the shared shards through a kept-uid mask: no copy of the pool)" if masked else ""
    at_once = (
        f"{min(sweep.concurrent_trials, len(trials))}" if sweep.concurrent_trials else "as many as the cluster holds"
    )
    lines = [
        f"sweep '{sweep.name}': shared stages {', '.join(shared.stages)} once, then {len(trials)} trials "
        f"({len(per_strategy)} strategies x {sweep.seeds} seed(s))",
        f"each trial: {', '.join(s for s in trials[0].recipe.stages if s not in shared.stages)}{mask_note}; "
        f"training on {need.actors * need.cpus:g} CPU(s){gpus}; {at_once} at once",
        f"training budget: {train.samples_seen:,} samples seen per trial, {train.samples_seen * len(trials):,} in all",
        *(f"open parameter {note}" for note in settled_strategies(sweep)[1]),
    ]
    if sweep.early_stopping:
        e = sweep.early_stopping
        lines.append(
            f"early stopping: a trial below the top 1/{e.reduction_factor:g} at a rung stops there; rungs at steps "
            f"{e.min_step} x {e.reduction_factor:g}^k, zero-shot scored every {train.checkpoint_every_steps} steps"
        )
    lines += [
        f"  {t.name}: {', '.join(s.name for s in t.recipe.filter.strategy) or '(no filter)'}, seed {t.seed}"
        for t in trials
    ]
    return lines


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
    """Shared stages once, then the trials, several at once; `consoles`: quiet runs (see `run_pipeline`).
    Returns the sweep folder and a row per trial."""
    from pipeline.executor import make_ray_map

    sweep, overrides = apply_sweep_overrides(sweep, overrides or [])
    shared, per_strategy = sweep_recipes(sweep, overrides)
    root = Path(shared.output_dir)
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
        log("--- shared ---")
        again = (sweep_dir / "shared" / "run.json").exists()
        shared_result = run_pipeline(
            shared.model_copy(update=runs_root), run_name="shared", resume=again, log=log,
            parent_run_id=sweep_run, consoles=consoles,
        )  # fmt: skip
        trials = [
            Trial(t.name, t.strategy, t.seed, with_early_stop(t.recipe.model_copy(update=runs_root), sweep, t.name))
            for t in sweep_trials(sweep, per_strategy)
        ]
        slots = trial_slots(sweep, trials[0].recipe, len(trials))
        log(f"--- {len(trials)} trials, {slots} at a time (consoles in {sweep_dir / 'trials'}) ---")
        reuse, folder = shared_result.manifests, str(sweep_dir)

        def trial_task(trial: Trial) -> StrategyRow:
            return run_trial(trial, folder, reuse, sweep_run)

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
            materialise(per_strategy[best.strategy], shared, runs_root, reuse, sweep_run, log, consoles)
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
