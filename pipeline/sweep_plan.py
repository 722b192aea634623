"""A sweep's plan: its recipes (shared stages, one per strategy), its trials (strategy x seed, and
with `pool_seed_key` a pool per seed), what each trial asks of the cluster, how many run at once,
and the lines `pipeline sweep --dry-run` prints. Nothing here starts a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, Recipe, apply_overrides, load_recipe
from pipeline.graph import build_stages, downstream
from pipeline.stage import Resources
from pipeline.sweep_config import SweepConfig, apply_sweep_overrides, settled_strategies
from stages.evaluate import Evaluate
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
    pool: int = 0  # which shared run it reuses: seed k's pool with `pool_seed_key`, else the one pool


def pool_seed(recipe: Recipe, key: str) -> int:
    """The value of the recipe key a sweep's `pool_seed_key` names (one line if it is not an integer)."""
    value = recipe
    for part in key.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"sweep.pool_seed_key: '{key}' is not an integer key of the base recipe")
    return value


def with_pool_seed(recipe: Recipe, key: str | None, k: int) -> Recipe:
    """The recipe with its pool drawn with seed + k (unchanged without a `pool_seed_key`)."""
    if key is None:
        return recipe
    data = apply_overrides(recipe.model_dump(mode="json"), [f"{key}={pool_seed(recipe, key) + k}"])
    return type(recipe).model_validate(data)


def shared_runs(sweep: SweepConfig, shared: Recipe) -> list[tuple[str, Recipe]]:
    """(run name, recipe) of the shared stages: one run, or one per pool seed."""
    if sweep.pool_seed_key is None:
        return [("shared", shared)]
    first = pool_seed(shared, sweep.pool_seed_key)
    return [(f"shared-pool{first + k}", with_pool_seed(shared, sweep.pool_seed_key, k)) for k in range(sweep.seeds)]


def sweep_recipes(sweep: SweepConfig, overrides: list[str]) -> tuple[Recipe, dict[str, Recipe]]:
    """(the shared-stages recipe, one recipe per strategy); all validated before anything runs."""
    base = load_recipe(sweep.recipe, [*sweep.overrides, *overrides, f"tracking.experiment={sweep.name}"])
    if sweep.pool_seed_key:
        pool_seed(base, sweep.pool_seed_key)  # an integer key, or one line now
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
    With `pool_seed_key`, seed k also draws the pool anew (that key + k) and reuses that pool's shared run.
    A trial writes no copy of the pool (unless `trial_subsets`): its training applies the strategy's
    decisions to the shared shards as a kept-uid mask (`stages.selection`)."""
    trials = []
    for k in range(sweep.seeds):
        for strategy, recipe in per_strategy.items():
            seed = recipe.train.seed + k
            name = strategy if sweep.seeds == 1 else f"{strategy}-seed{seed}"
            update = {Train.name: recipe.train.model_copy(update={"seed": seed})}
            if not sweep.trial_subsets:
                update["stages"] = [s for s in recipe.stages if s != Subset.name]
            trial = with_pool_seed(recipe.model_copy(update=update), sweep.pool_seed_key, k)
            pool = k if sweep.pool_seed_key else 0
            trials.append(Trial(name, strategy, seed, trial, pool))
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
    pools = shared_runs(sweep, shared)
    once = (
        "once" if len(pools) == 1 else f"once per pool seed ({sweep.pool_seed_key}: {', '.join(n for n, _ in pools)})"
    )
    lines = [
        f"sweep '{sweep.name}': shared stages {', '.join(shared.stages)} {once}, then {len(trials)} trials "
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
