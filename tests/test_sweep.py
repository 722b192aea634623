"""Sweeps: shared stages once, one child MLflow run per strategy, equal compute, a results table."""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.sweep import load_sweep, run_sweep, sweep_recipes
from tests.conftest import fast_filter_overrides, small_demo_overrides


def _sweep_file(tmp_path, strategies: dict) -> str:
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump({"name": "mini", "recipe": "demo", "strategies": strategies}, sort_keys=False))
    return str(path)


def _overrides(tmp_path, embed_model: str) -> list[str]:
    """The small demo with a saved CLIP scoring the pool instead of trained seed models (no strategy
    here reads dfn_score or a head): the sweep's point is the shared stages and the strategies."""
    return [
        *[o for o in small_demo_overrides(tmp_path / "runs") if not o.startswith("stages=")],
        *fast_filter_overrides(),
        "stages=[demo_pool, download, phash, dedupe, embed, filter, subset, train, evaluate]",
        f"embed.model={embed_model}",
        "train.samples_seen=64",
        "train.batch_size=32",
        "train.workers=1",  # Ray Train starts one worker faster than the demo's two; the same compute per strategy
        "train.checkpoint_every_samples=64",
        "subset.samples_per_shard=60",
    ]


def test_shipped_sweeps_validate_and_bad_strategies_fail_before_work(tmp_path):
    demo = load_sweep("demo_sweep")
    shared, per_strategy = sweep_recipes(demo, [f"output_dir={tmp_path}"])
    assert "filter" not in shared.stages and "embed" in shared.stages
    assert {r.train.samples_seen for r in per_strategy.values()} == {shared.train.samples_seen}  # equal compute
    bad = load_sweep(_sweep_file(tmp_path, {"x": [{"name": "aesthetic", "head": "/nope.pt"}]}))
    with pytest.raises(ConfigError, match="head weights not found"):
        sweep_recipes(bad, [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="strategies.y.0"):
        load_sweep(_sweep_file(tmp_path, {"y": [{"name": "nope"}]}))
    assert not list(tmp_path.glob("mini-*"))


def test_datacomp_baselines_sweep_lists_every_baseline_and_validates():
    from filters.presets import PRESETS

    sweep = load_sweep("datacomp_baselines")
    _, per_strategy = sweep_recipes(sweep, ["output_dir=/tmp/unused"])
    used = {step.name for recipe in per_strategy.values() for step in recipe.filter.strategy}
    every_filter = {step["name"] for steps in PRESETS.values() for step in steps} - {"dedupe", "aesthetic"}
    assert every_filter <= used  # dedupe and aesthetic are demo_sweep's; laion_a is its own recipe
    assert {"none", "datacomp_1b", "laion2b", "semantic_dedupe", "metaclip_balance"} <= set(per_strategy)
    assert [s.name for s in per_strategy["datacomp_1b"].filter.strategy] == ["image_based", "clip_score"]


@pytest.mark.slow
def test_sweep_runs_strategies_on_shared_stages_and_logs_the_table(ray_cluster, tiny_model, tmp_path):
    sweep = load_sweep(
        _sweep_file(
            tmp_path, {"none": [], "dedupe_clip": [{"name": "dedupe"}, {"name": "clip_score", "top_fraction": 0.5}]}
        )
    )
    sweep_dir, rows = run_sweep(sweep, _overrides(tmp_path, tiny_model), log=lambda m: None)
    assert [r.strategy for r in rows] == ["none", "dedupe_clip"]
    none, filtered = rows
    assert none.kept == none.pool and filtered.kept < none.pool * 0.5 + 1
    # shared stages ran once: the strategies' folders have no download/embed of their own
    assert (sweep_dir / "shared" / "embed" / "manifest.json").exists()
    assert not (sweep_dir / "none" / "download").exists() and not (sweep_dir / "none" / "embed").exists()
    for name in ("none", "dedupe_clip"):
        train = json.loads((sweep_dir / name / "train" / "manifest.json").read_text())
        assert train["metrics"]["samples_seen"] == 64  # the same compute for every strategy
    assert "| dedupe_clip |" in (sweep_dir / "results" / "results.md").read_text()

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mini").experiment_id
    runs = client.search_runs([experiment])
    by_id = {r.info.run_id: r for r in runs}
    sweep_run = next(r for r in runs if r.info.run_name == sweep_dir.name)
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id}
    assert children == {"shared", "none", "dedupe_clip"}
    stage_parents = sorted(
        (by_id[r.data.tags["mlflow.parentRunId"]].info.run_name, r.info.run_name)
        for r in runs
        if r.data.tags.get("stage") in ("filter", "train", "embed")
    )
    assert stage_parents == [
        ("dedupe_clip", "filter"),
        ("dedupe_clip", "train"),
        ("none", "filter"),
        ("none", "train"),
        ("shared", "embed"),
    ]
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id, "results")} == {
        "results/results.csv",
        "results/results.md",
        "results/accuracy_vs_kept.png",
    }
    assert sweep_run.data.metrics["dedupe_clip/kept_fraction"] == pytest.approx(filtered.kept_fraction)
    assert all(r.info.status == "FINISHED" for r in runs)
