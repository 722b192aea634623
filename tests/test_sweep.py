"""Sweeps: shared stages once, one child MLflow run per strategy, equal compute, a results table."""

from __future__ import annotations

import json
import re

import mlflow
import pytest
import yaml

from pipeline.config import ConfigError, load_recipe
from pipeline.sweep import run_sweep, sweep_plan, sweep_recipes
from pipeline.sweep_config import available_sweeps, load_sweep
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
    for name in available_sweeps():  # every shipped sweep plans (validated, nothing started)
        assert sweep_plan(load_sweep(name), [f"output_dir={tmp_path}"])[0].startswith(f"sweep '{name}'")
    plan = sweep_plan(demo, [f"output_dir={tmp_path}"])
    assert "each trial: filter, train, evaluate (training reads the shared shards through a kept-uid mask" in plan[1]
    no_subset = [
        f"output_dir={tmp_path}",
        "stages=[demo_pool, download, phash, dedupe, embed, filter, train, evaluate]",
    ]
    with pytest.raises(ConfigError, match="materialise_best writes a subset, but the base recipe has no subset"):
        sweep_recipes(demo.model_copy(update={"materialise_best": True}), no_subset)
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
    # one training worker of 1 CPU each on a 2-CPU cluster: the two trials ran at the same time
    assert none.started < filtered.ended and filtered.started < none.ended, rows
    assert none.kept == none.pool and filtered.kept < none.pool * 0.5 + 1
    # shared stages ran once: the strategies' folders have no download/embed of their own
    assert (sweep_dir / "shared" / "embed" / "manifest.json").exists()
    assert not (sweep_dir / "none" / "download").exists() and not (sweep_dir / "none" / "embed").exists()
    downloaded = json.loads((sweep_dir / "shared" / "download" / "manifest.json").read_text())["kept"]
    for name, row in (("none", none), ("dedupe_clip", filtered)):
        train = json.loads((sweep_dir / name / "train" / "manifest.json").read_text())
        assert train["metrics"]["samples_seen"] == 64  # the same compute for every strategy
        # no copy of the pool per trial: training read the shared shards through the strategy's mask
        assert not (sweep_dir / name / "subset").exists() and (sweep_dir / name / "train" / "kept").is_dir()
        assert train["in"] == downloaded and train["kept"] == row.kept
        assert train["in"] == train["kept"] + sum(train["dropped"].values())
    assert "| dedupe_clip |" in (sweep_dir / "results" / "results.md").read_text()
    best = max(rows, key=lambda r: r.zeroshot_top1)  # one seed each: the mean is the trial's own
    best_recipe = load_recipe(str(sweep_dir / "results" / "best_recipe.yaml"))  # ready for `pipeline run`
    assert [s.name for s in best_recipe.filter.strategy] == ([] if best is none else ["dedupe", "clip_score"])
    assert best_recipe.train.samples_seen == 64 and best_recipe.output_dir == "runs"

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
        "results/best_recipe.yaml",
    }
    assert sweep_run.data.metrics["dedupe_clip/kept_fraction"] == pytest.approx(filtered.kept_fraction)
    assert sweep_run.data.metrics["dedupe_clip/zeroshot_top1_std"] == 0.0  # one seed: no spread
    assert all(r.info.status == "FINISHED" for r in runs)

    # killed after one trial finished and while the other evaluated: the resume keeps the finished
    # trial as it is and runs only what the other lacks
    (sweep_dir / "dedupe_clip" / "evaluate" / "manifest.json").unlink()
    trained = {
        name: (sweep_dir / name / "train" / "manifest.json").stat().st_mtime_ns for name in ("none", "dedupe_clip")
    }
    materialise = sweep.model_copy(update={"materialise_best": True})  # and now the winner's copy, on request
    again, resumed = run_sweep(materialise, _overrides(tmp_path, tiny_model), resume=True, log=lambda m: None)
    assert again == sweep_dir and [r.zeroshot_top1 for r in resumed] == [r.zeroshot_top1 for r in rows]
    copied = json.loads((sweep_dir / "best" / "subset" / "manifest.json").read_text())
    assert copied["kept"] == best.kept and not (sweep_dir / "best" / "train").exists()
    assert trained == {n: (sweep_dir / n / "train" / "manifest.json").stat().st_mtime_ns for n in trained}
    none_log, other_log = ((sweep_dir / "trials" / f"{n}.log").read_text() for n in ("none", "dedupe_clip"))
    assert none_log.count("[evaluate] in=") == 1 and "[evaluate] finished earlier, skipped" in none_log
    assert other_log.count("[evaluate] in=") == 2 and "[train] finished earlier, skipped" in other_log
    assert (sweep_dir / "dedupe_clip" / "evaluate" / "manifest.json").exists()


def test_seeds_make_trials_and_the_table_reports_the_spread(tmp_path):
    """Without Ray: `sweep.seeds` from --set, one trial per strategy and seed, mean ± std per strategy,
    and a difference marked only when it exceeds both spreads."""
    from pipeline.sweep import sweep_plan, sweep_trials
    from pipeline.sweep_config import apply_sweep_overrides
    from pipeline.sweep_plan import shared_runs
    from pipeline.sweep_table import StrategyRow, markdown, summarise

    sweep = load_sweep(_sweep_file(tmp_path, {"none": [], "dedupe": [{"name": "dedupe"}]}))
    sweep, rest = apply_sweep_overrides(sweep, ["sweep.seeds=3", "train.lr=0.01", "sweep.concurrent_trials=2"])
    assert (sweep.seeds, sweep.concurrent_trials, rest) == (3, 2, ["train.lr=0.01"])
    with pytest.raises(ConfigError, match="seeds"):
        apply_sweep_overrides(sweep, ["sweep.seeds=0"])
    _, per_strategy = sweep_recipes(sweep, [f"output_dir={tmp_path}", *rest])
    trials = sweep_trials(sweep, per_strategy)
    base = per_strategy["none"].train.seed
    assert [(t.name, t.recipe.train.seed) for t in trials] == [
        (f"none-seed{base}", base), (f"dedupe-seed{base}", base),
        (f"none-seed{base + 1}", base + 1), (f"dedupe-seed{base + 1}", base + 1),
        (f"none-seed{base + 2}", base + 2), (f"dedupe-seed{base + 2}", base + 2),
    ]  # fmt: skip
    assert {t.recipe.train.lr for t in trials} == {0.01} and trials[1].recipe.filter.strategy[0].name == "dedupe"
    plan = sweep_plan(sweep, [f"output_dir={tmp_path}", "train.workers=2"])  # what --dry-run prints
    assert "then 6 trials (2 strategies x 3 seed(s))" in plan[0] and "training on 2 CPU(s); 2 at once" in plan[1]
    assert plan[-1] == f"  dedupe-seed{base + 2}: dedupe, seed {base + 2}" and not list(tmp_path.glob("mini-*"))

    def row(strategy, top1, seed):
        return StrategyRow(strategy, 50, 100, top1, 0.5, 0.2, 0.2, seed=seed)

    rows = [row("none", 0.10, 0), row("none", 0.12, 1), row("none", 0.14, 2)]
    rows += [row("close", 0.13, 0), row("close", 0.15, 1), row("close", 0.17, 2)]  # +0.03, inside 0.02 + 0.02
    rows += [row("far", 0.30, 0), row("far", 0.31, 1), row("far", 0.32, 2)]  # +0.19, outside 0.02 + 0.01
    none, close, far = summarise(rows)
    assert none.seeds == 3 and none.metrics["zeroshot_top1"].mean == pytest.approx(0.12)
    assert none.metrics["zeroshot_top1"].std == pytest.approx(0.02)  # sample standard deviation
    assert not close.differs(none, "zeroshot_top1") and far.differs(none, "zeroshot_top1")
    table = markdown([none, close, far])
    assert "| far | 3 | 0.500 | 0.310 ± 0.010* |" in table and "| close | 3 | 0.500 | 0.150 ± 0.020 |" in table
    single = summarise([row("none", 0.1, 0), row("far", 0.9, 0)])
    assert not single[1].differs(single[0], "zeroshot_top1")  # one seed: no spread, no claim

    # on the demo, seed k also draws the pool anew: a shared run per pool, each trial on its seed's pool
    pooled, _ = apply_sweep_overrides(sweep, ["sweep.pool_seed_key=source.demo.seed"])
    shared, per_strategy = sweep_recipes(pooled, [f"output_dir={tmp_path}"])
    first = shared.source.demo.seed
    assert [(name, r.source.demo.seed) for name, r in shared_runs(pooled, shared)] == [
        (f"shared-pool{first + k}", first + k) for k in range(3)
    ]
    trials = sweep_trials(pooled, per_strategy)
    assert [(t.pool, t.recipe.source.demo.seed, t.recipe.train.seed - base) for t in trials[::2]] == [
        (k, first + k, k) for k in range(3)
    ]
    assert "once per pool seed (source.demo.seed: shared-pool" in sweep_plan(pooled, [f"output_dir={tmp_path}"])[0]
    with pytest.raises(ConfigError, match="'train.model' is not an integer key"):
        sweep_recipes(pooled.model_copy(update={"pool_seed_key": "train.model"}), [f"output_dir={tmp_path}"])


def test_open_parameters_become_one_strategy_per_setting(tmp_path):
    """Without Ray: `{grid: [...]}` tries each value, `{search: [lo, hi]}` draws `search_points` seeded
    values; every combination is a strategy named after its values; bad specs fail on load in one line."""
    from pipeline.sweep import sweep_plan
    from pipeline.sweep_config import apply_sweep_overrides, settled_strategies

    open_steps = [
        {"name": "clip_score", "top_fraction": {"search": [0.3, 0.9]}},
        {"name": "aesthetic", "threshold": {"grid": [4, 6]}},
    ]
    sweep = load_sweep(_sweep_file(tmp_path, {"none": [], "cut": open_steps}))
    settled, notes = settled_strategies(sweep)
    fractions = sorted({s[0].top_fraction for n, s in settled.items() if n != "none"})
    assert len(fractions) == 4  # search_points defaults to 4: one drawn in each quarter of the range
    assert all(0.3 + 0.15 * k <= f <= 0.3 + 0.15 * (k + 1) for k, f in enumerate(fractions)), fractions
    assert len(settled) == 1 + 4 * 2  # every fraction with every threshold
    name = f"cut-top_fraction={fractions[0]:g}-threshold=4"
    assert settled[name][0].top_fraction == fractions[0] and settled[name][1].threshold == 4
    assert "cut: clip_score.top_fraction, search [0.3, 0.9], 4 random point(s) (seed 0)" in notes[0]
    assert settled_strategies(load_sweep(_sweep_file(tmp_path, {"none": [], "cut": open_steps})))[0].keys() == (
        settled.keys()
    )  # the same draws on every load: a resumed sweep finds its trials' folders
    more, _ = apply_sweep_overrides(sweep, ["sweep.search_points=6", "sweep.search_seed=1"])
    drawn = {s[0].top_fraction for n, s in settled_strategies(more)[0].items() if n != "none"}
    assert len(drawn) == 6 and drawn != set(fractions)
    _, per_strategy = sweep_recipes(sweep, [f"output_dir={tmp_path}"])
    assert per_strategy[name].filter.strategy[1].threshold == 4
    plan = sweep_plan(sweep, [f"output_dir={tmp_path}"])
    assert "then 9 trials (9 strategies x 1 seed(s))" in plan[0]
    assert any(line.startswith("open parameter cut: aesthetic.threshold, grid of 2: 4, 6") for line in plan)
    integer = {"none": [], "n": [{"name": "metaclip_balance", "t": {"search": [2, 9]}, "words": ["cat"]}]}
    whole = settled_strategies(load_sweep(_sweep_file(tmp_path, integer)))[0]
    assert all(s[0].t == int(s[0].t) and 2 <= s[0].t <= 9 for s in whole.values() if s)  # integer bounds: integers
    assert all(re.fullmatch(r"n-t=\d", n) for n in whole if n != "none"), list(whole)
    for strategies, message in [
        ({"x": [{"name": "clip_score", "top_fraction": {"search": [0.9, 0.3]}}]}, "search takes [low, high]"),
        ({"x": [{"name": "clip_score", "top_fraction": {"grid": []}}]}, "grid takes a non-empty list"),
        ({"x": [{"name": "clip_score", "top_fraction": {"grid": [0.5], "search": [0, 1]}}]}, "one key, grid or search"),
        ({"x": [{"name": "clip_score", "top_fraction": {"grid": [1.5]}}]}, "strategies.x-top_fraction=1.5.0"),
        ({"../up": []}, "it names a folder"),
        ({"results": []}, "none of early_stop, results, shared, trials"),
        (
            {"x": [{"name": "clip_score", "top_fraction": {"grid": [1], 2: 3}}]},
            "one key, grid or search (got ['2', 'grid'])",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            load_sweep(_sweep_file(tmp_path, strategies))
        assert "\n" not in str(err.value)
    presets = load_sweep(_sweep_file(tmp_path, {"none": [], "l": "laion2b"}))  # a preset name as the strategy
    assert [s.name for s in settled_strategies(presets)[0]["l"]] == ["clip_score", "basic"]
    shipped = load_sweep("demo_search")
    assert len(settled_strategies(shipped)[0]) == 1 + shipped.search_points


def test_early_stopping_cuts_at_the_asha_quantile_and_the_table_sets_stopped_trials_apart(tmp_path):
    """Without Ray: the board's rule (Ray Tune's ASHA cutoff) and how a sweep reports stopped trials."""
    from pipeline.sweep import best_strategy, write_best_recipe
    from pipeline.sweep_config import EarlyStopping
    from pipeline.sweep_table import StrategyRow, markdown, summarise
    from stages.train.early_stop import EarlyStopConfig, cutoff, decide, rung_of

    def trial(name, **kw):
        return EarlyStopConfig(board=str(tmp_path / "board"), trial=name, **kw)

    assert decide(trial("a"), 4, 0.30) is None  # rungs at 1, 3, 9, ... (rf 3): step 4 is rung 1's first; a is first
    assert "0.100 at step 4 is below the cutoff 0.300 (top 1/3 of 1 other trial(s) at rung 1)" in decide(
        trial("b"), 4, 0.10
    )
    assert decide(trial("c"), 4, 0.35) is None
    assert cutoff([0.1, 0.3, 0.35], 3) == pytest.approx(0.3 + 0.05 / 3)  # the 2/3 quantile: the top third goes on
    assert decide(trial("d"), 4, 0.31) is not None  # below that quantile of a, b and c
    assert cutoff([0.1, 0.3, 0.35, 0.31], 2) == pytest.approx(0.305)
    assert decide(trial("a"), 6, 0.0) is None  # rung 1 judged a at step 4 already
    assert decide(trial("b"), 9, 0.0) is None  # the first at rung 2
    assert [rung_of(trial("x"), step) for step in (1, 2, 3, 8, 9, 26, 27)] == [0, 0, 1, 1, 2, 2, 3]
    assert [rung_of(trial("x", min_step=8, reduction_factor=2), step) for step in (7, 8, 15, 16)] == [None, 0, 0, 1]
    assert decide(trial("f", min_step=8), 4, 0.0) is None  # before the first rung nothing stops
    assert sorted(p.stem for p in (tmp_path / "board" / "rung_1").iterdir()) == list("abcd")

    def row(strategy, top1, seed, stopped=0):
        return StrategyRow(strategy, 50, 100, top1, 0.5, 0.2, 0.2, seed=seed, stopped_at_step=stopped)

    rows = [row("none", 0.10, 0), row("none", 0.12, 1), row("cut", 0.30, 0), row("cut", 0.02, 1, stopped=2)]
    rows += [row("bad", 0.50, 0, stopped=2), row("bad", 0.40, 1, stopped=2)]
    none, cut, bad = summarise(rows)
    assert (cut.seeds, cut.stopped, cut.metrics["zeroshot_top1"].mean) == (1, 1, pytest.approx(0.30))
    assert (bad.seeds, bad.stopped) == (0, 2) and not bad.differs(none, "zeroshot_top1")
    table = markdown([none, cut, bad])
    assert "| cut | 1 | 0.500 | 0.300 ± 0.000 | 0.500 ± 0.000 | 0.200 ± 0.000 | 0.200 ± 0.000 | 1 |" in table
    best = best_strategy([none, cut, bad])
    assert best is cut  # 'bad' scored higher, but only on less compute
    written = write_best_recipe(best, load_recipe("demo", [f"output_dir={tmp_path}"]), tmp_path / "best.yaml")
    assert written.read_text().startswith("# 'cut': zero-shot top-1 0.300 ± 0.000 over 1 seed(s)")
    sweep = load_sweep(_sweep_file(tmp_path, {"none": []}))
    with pytest.raises(ConfigError, match="early_stopping reads the zero-shot curve"):
        sweep_recipes(sweep.model_copy(update={"early_stopping": EarlyStopping()}), ["train.zeroshot_frequency=0"])
