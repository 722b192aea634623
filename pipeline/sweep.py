"""Sweeps: one pool, several filter strategies, the same training compute, one results table.

A sweep names a base recipe and a set of strategies. The stages above the strategy (download,
hashes, seed models, embeddings, heads) run once, in a `shared` run; each strategy then runs
filter → subset → train → evaluate with those stages reused, and the training budget (model,
samples seen, batch, seed) of the base recipe unchanged, so strategies differ only in their
data. MLflow: one sweep run, a child run per strategy (and for the shared stages), each with
its stage runs below it; the sweep run holds the results table and the accuracy-vs-kept plot.
Strategies run one after another, each using the whole cluster for training.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from pydantic import Field, ValidationError

from filters.registry import Strategy
from pipeline.atomic import atomic_path, write_json, write_text, write_with
from pipeline.config import ConfigError, Recipe, format_validation_error, load_recipe, read_yaml_mapping
from pipeline.graph import build_stages, downstream
from pipeline.models import StrictModel
from pipeline.orchestrator import RunResult, run_pipeline
from pipeline.runtime import ray_runtime
from pipeline.tracking import Tracker, metric_key
from stages.evaluate import Evaluate, EvaluateOutputs
from stages.filter import Filter
from stages.train import Train

SWEEPS_PACKAGE = "pipeline.sweeps"


class SweepConfig(StrictModel):
    name: str
    description: str = ""
    recipe: str = Field(description="base recipe: everything but filter.strategy")
    overrides: list[str] = Field(default_factory=list, description="--set overrides applied to the base recipe")
    strategies: dict[str, Strategy] = Field(min_length=1)


@dataclass
class StrategyRow:
    strategy: str
    kept: int
    pool: int
    zeroshot_top1: float
    zeroshot_top5: float
    image_to_text_r1: float
    text_to_image_r1: float

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.pool if self.pool else 0.0


def available_sweeps() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(SWEEPS_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def load_sweep(name_or_path: str) -> SweepConfig:
    data = read_yaml_mapping(name_or_path, SWEEPS_PACKAGE, "sweep")
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err, name_or_path).replace("invalid recipe", "invalid sweep")
        ) from None


def sweep_recipes(sweep: SweepConfig, overrides: list[str]) -> tuple[Recipe, dict[str, Recipe]]:
    """(the shared-stages recipe, one recipe per strategy); all validated before anything runs."""
    base = load_recipe(sweep.recipe, [*sweep.overrides, *overrides, f"tracking.experiment={sweep.name}"])
    missing = [s.name for s in (Filter, Train, Evaluate) if s.name not in base.stages]
    if missing:
        raise ConfigError(f"sweep '{sweep.name}': the base recipe's stages lack {', '.join(missing)}")
    varying = downstream(build_stages(base, check=False), {Filter.name})  # the strategy's stage and all that read it
    shared = base.model_copy(update={"stages": [s for s in base.stages if s not in varying]})
    per_strategy = {}
    for name, steps in sweep.strategies.items():
        recipe = base.model_copy(update={Filter.name: base.filter.model_copy(update={"strategy": steps})})
        build_stages(recipe)  # a strategy that cannot run fails here, before the shared stages start
        per_strategy[name] = recipe
    return shared, per_strategy


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
    )


def write_table(rows: list[StrategyRow], folder: Path) -> list[Path]:
    """results.csv, results.md and accuracy_vs_kept.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    header = ["strategy", "kept", "kept_fraction", "zeroshot_top1", "zeroshot_top5", "i2t_R@1", "t2i_R@1"]
    values = [
        [r.strategy, r.kept, r.kept_fraction, r.zeroshot_top1, r.zeroshot_top5, r.image_to_text_r1, r.text_to_image_r1]
        for r in rows
    ]
    with atomic_path(folder / "results.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(values)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in values:
        lines.append(f"| {v[0]} | {v[1]} | {v[2]:.3f} | " + " | ".join(f"{x:.3f}" for x in v[3:]) + " |")
    write_text(folder / "results.md", "\n".join(lines) + "\n")
    return [folder / "results.csv", folder / "results.md", _plot(rows, folder / "accuracy_vs_kept.png")]


def _plot(rows: list[StrategyRow], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.scatter(row.kept_fraction, row.zeroshot_top1)
        ax.annotate(
            row.strategy, (row.kept_fraction, row.zeroshot_top1), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xlabel("kept fraction of the pool")
    ax.set_ylabel("zero-shot top-1")
    ax.set_title("same compute, different data")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


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
    """Shared stages once, then each strategy's run; `consoles`: quiet runs (see `run_pipeline`)."""
    shared, per_strategy = sweep_recipes(sweep, overrides or [])
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
    rows: list[StrategyRow] = []
    with (
        ray_runtime(shared.ray, log),
        tracker.parent_run(sweep_dir.name, sweep.model_dump(mode="json"), record["mlflow_run_id"]) as sweep_run,
    ):
        record["mlflow_run_id"] = sweep_run
        write_json(sweep_dir / "sweep.json", record)
        # every run of the sweep lives in its folder and logs to the sweep's MLflow store
        runs_root = {"output_dir": str(sweep_dir), "tracking": shared.tracking.model_copy(update={"uri": tracker.uri})}

        def run(recipe: Recipe, name: str, reuse=None) -> RunResult:
            recipe = recipe.model_copy(update=runs_root)
            again = (sweep_dir / name / "run.json").exists()
            log(f"--- {name} ---")
            return run_pipeline(
                recipe, run_name=name, resume=again, log=log, reuse=reuse, parent_run_id=sweep_run, consoles=consoles
            )

        shared_result = run(shared, "shared")
        for name, recipe in per_strategy.items():
            result = run(recipe, name, reuse=shared_result.manifests)
            rows.append(result_row(name, result))
            log(f"[{name}] kept {rows[-1].kept}/{rows[-1].pool}, zero-shot top-1 {rows[-1].zeroshot_top1:.3f}")
        paths = write_table(rows, sweep_dir / "results")
        for path in paths if sweep_run else []:
            tracker.call("log_artifact", sweep_run, str(path), "results")
        for row in rows if sweep_run else []:
            for key, value in (
                ("kept_fraction", row.kept_fraction),
                ("zeroshot_top1", row.zeroshot_top1),
                ("image_to_text_R1", row.image_to_text_r1),
            ):
                tracker.call("log_metric", sweep_run, metric_key(f"{row.strategy}/{key}"), value)
    return sweep_dir, rows
