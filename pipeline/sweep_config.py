"""A sweep's file: its base recipe, its strategies (some parameters possibly left open), seeds and
search settings; loaded and validated in one place, before anything runs."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml
from pydantic import Field, ValidationError

from filters.registry import Strategy
from pipeline.config import ConfigError, format_validation_error, read_yaml_mapping
from pipeline.models import StrictModel
from pipeline.sweep_search import settle

SWEEPS_PACKAGE = "pipeline.sweeps"


class EarlyStopping(StrictModel):
    """ASHA on the zero-shot curve the train stage scores at its checkpoints (see `stages.train.early_stop`)."""

    reduction_factor: float = Field(3.0, ge=2, description="a trial goes on only in the top 1/rf at each checkpoint")
    min_step: int = Field(1, ge=1, description="no trial is stopped before this training step")


class SweepConfig(StrictModel):
    name: str
    description: str = ""
    recipe: str = Field(description="base recipe: everything but filter.strategy")
    overrides: list[str] = Field(default_factory=list, description="--set overrides applied to the base recipe")
    strategies: dict[str, list[Any] | str] = Field(
        min_length=1,
        description="filter steps per strategy; a parameter may be left open: {grid: [..]} or {search: [lo, hi]}",
    )
    search_points: int = Field(4, ge=1, le=100, description="settings drawn per {search: [lo, hi]} parameter")
    search_seed: int = Field(0, description="seeds the draws of {search: ...}: the same sweep draws the same settings")
    seeds: int = Field(1, ge=1, le=100, description="training seeds per strategy: train.seed, train.seed + 1, ...")
    concurrent_trials: int = Field(
        0, ge=0, description="trials at once; 0: as many as the cluster's CPUs (and GPUs) hold their training"
    )
    early_stopping: EarlyStopping | None = Field(None, description="stop trials whose zero-shot curve falls behind")
    trial_subsets: bool = Field(
        False,
        description="each trial writes its strategy's filtered copy of the pool (subset); "
        "default: trials train from the shared shards through a kept-uid mask",
    )
    pool_seed_key: str | None = Field(
        None,
        description="a recipe key seed k adds k to as well (source.demo.seed: a pool drawn anew per seed); "
        "the shared stages then run once per seed",
    )
    materialise_best: bool = Field(
        False, description="write the best strategy's filtered copy of the pool (filter, subset) under <sweep>/best"
    )


class _SettledStrategies(StrictModel):
    strategies: dict[str, Strategy]


def settled_strategies(sweep: SweepConfig) -> tuple[dict[str, list | str], list[str]]:
    """Every strategy with its open parameters set (see `pipeline.sweep_search`), validated; and a line
    per open parameter for the dry run."""
    settled, notes = settle(sweep.strategies, sweep.search_points, sweep.search_seed)
    try:
        return _SettledStrategies(strategies=settled).strategies, notes
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, sweep.name).replace("invalid recipe", "invalid sweep")) from None


def available_sweeps() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(SWEEPS_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def load_sweep(name_or_path: str) -> SweepConfig:
    data = read_yaml_mapping(name_or_path, SWEEPS_PACKAGE, "sweep")
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err, name_or_path).replace("invalid recipe", "invalid sweep")
        ) from None
    settled_strategies(sweep)  # a bad strategy or open parameter fails on load
    return sweep


def apply_sweep_overrides(sweep: SweepConfig, overrides: list[str]) -> tuple[SweepConfig, list[str]]:
    """`sweep.KEY=VALUE` overrides set the sweep's own keys (`sweep.seeds=3`); the rest go to the base recipe."""
    own, rest = {}, []
    for override in overrides:
        if not override.startswith("sweep."):
            rest.append(override)
            continue
        key, sep, value = override.removeprefix("sweep.").partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override}: expected sweep.KEY=VALUE")
        own[key] = yaml.safe_load(value)
    if not own:
        return sweep, rest
    try:
        changed = SweepConfig.model_validate({**sweep.model_dump(mode="json"), **own})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "--set").replace("invalid recipe", "invalid sweep")) from None
    settled_strategies(changed)
    return changed, rest
