"""The benchmarks' one result format (benchmarks/benchmark_result.py): what a README table is built from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_modules import load_benchmark


def test_a_result_has_the_shared_keys_the_ratio_and_the_machine(tmp_path):
    bench = load_benchmark("benchmark_result")
    row = bench.result("train", 190.0, 200.0, "samples/s", {"steps": 60}, startup_s={"ours": 21.0})
    assert set(row) == {"name", "ours", "anchor", "ratio", "unit", "params", "machine", "extra"}
    assert row["ratio"] == 0.95 and row["extra"] == {"startup_s": {"ours": 21.0}}
    assert row["machine"]["cores"] == os.cpu_count() and row["machine"]["memory_gib"] > 0
    floored = bench.result("phash", 3.0, 1.0, "images/s", {}, floor=4.0)
    assert floored["floor"] == 4.0 and floored["ratio"] == 3.0 and "extra" not in floored
    path = tmp_path / "out.json"
    bench.write_results(str(path), [row, floored])
    assert [r["name"] for r in json.loads(path.read_text())] == ["train", "phash"]
    bench.write_results(None, [row])  # no --json: nothing written, nothing raised


def test_the_floors_measure_the_forced_work_at_a_positive_rate(tiny_model):
    """The pHash floor decodes what imagehash decodes (bytes it cannot open fail it); the embed
    floor runs the saved model's towers on tensors of its own input size."""
    import io

    import pytest
    from PIL import Image

    dedupe, embed = load_benchmark("dedupe"), load_benchmark("embed")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(jpeg, "JPEG")
    assert dedupe.decode_floor([("a", jpeg.getvalue())] * 3) > 0
    with pytest.raises(OSError):
        dedupe.decode_floor([("b", b"not an image")])
    assert embed.model_alone(tiny_model, batch_size=4, batches=1) > 0


def test_hashing_ratios_are_taken_within_each_round_and_summarised_by_median_and_range():
    """Drift between rounds must not pair one round's floor with another's side."""
    base = {"differ_kernel": 0, "differ_stage": 0}
    rounds = [
        base | {"loop": 120.0, "floor_one_core": 200.0, "kernel": 180.0, "floor_all_cores": 400.0, "stage": 360.0},
        base | {"loop": 100.0, "floor_one_core": 200.0, "kernel": 190.0, "floor_all_cores": 380.0, "stage": 380.0},
        base | {"loop": 50.0, "floor_one_core": 100.0, "kernel": 75.0, "floor_all_cores": 300.0, "stage": 240.0},
    ]
    kernel, stage = load_benchmark("dedupe").report_hashing(rounds, n=10, shards=2, cores=2, image_size=64)
    # 1.5, 1.9, 1.5 within the rounds; the medians' quotient (180 / 100) would say 1.8
    assert kernel["ours"] == 180.0 and kernel["floor"] == 200.0 and kernel["ratio"] == 1.5
    extra = kernel["extra"]
    assert (extra["of_floor_min"], extra["of_floor_max"]) == (0.75, 0.95)
    assert stage["floor"] == 380.0 and stage["extra"]["of_floor_min"] == 0.8 and stage["extra"]["of_floor_max"] == 1.0
    assert stage["extra"]["of_one_core_floor_times_cores"] == 0.95  # 380 / (200 x 2): the rounds' median


def test_the_embed_benchmarks_cpu_floor_prepares_a_shard_on_one_core(tiny_model, tmp_path):
    shards = load_benchmark("scene_shards").write_scene_shards(tmp_path, 20, 48, 20, unique=5)
    assert load_benchmark("embed").preprocess_alone(shards[0], tiny_model, batch_size=8) > 0


def test_the_search_benchmark_runs_exact_in_a_process_of_its_own():
    """Its tiny setting, as a user runs it by hand at 10M: every sampled true pair found, memory read."""
    row = load_benchmark("dedupe").bench_search(3000, 8, 40)
    assert row["extra"]["recall"] == 1.0 and row["extra"]["pairs"] >= 30  # 1% planted near-duplicates
    assert row["extra"]["rss_peak_during_search_mib"] >= row["extra"]["rss_before_search_mib"] > 0


def test_the_scale_benchmark_runs_the_stages_on_its_synthetic_pool(tmp_path):
    """Its tiny setting, as a user runs it by hand at 1M and 10M rows: every stage timed, memory read,
    and the strategy kept some rows and dropped others."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "scale.py"
    args = [
        "--rows",
        "3000",
        "--per-shard",
        "1000",
        "--dim",
        "16",
        "--clusters",
        "5",
        "--json",
        str(tmp_path / "r.json"),
    ]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads((tmp_path / "r.json").read_text())
    extra = row["extra"]
    assert set(extra["stage_seconds"]) == {"dedupe", "filter", "subset_decisions"} and row["ours"] > 0
    assert extra["driver_peak_rss_mib"] >= extra["driver_rss_after_writing_mib"] > 0
    assert extra["largest_worker_peak_rss_mib"] > 0  # the filter's k-means ran as Ray tasks
    assert 0 < extra["kept"] < extra["dedupe_kept"] < 3000  # 1% planted near-duplicates went first


def test_the_readmes_demo_tables_are_what_the_report_renders_from_its_saved_results():
    """The README's demo figures are benchmarks/report.py's rendering of the results it saved, as
    one block: a figure edited by hand, or a table left over from an older run, fails here."""
    root = Path(__file__).parents[1]
    report = load_benchmark("report")
    saved = json.loads((root / "benchmarks" / "results" / "2026-12-01-demo-report-3-tuning-pools.json").read_text())
    rendered = report.render(saved)
    assert rendered.count("\n| ") > 30 and "k = 4: the same" in rendered  # the rule picked the scoring runs' radius
    assert rendered.count("the scoring runs used") == 4  # the radius, dfn, aesthetic, nsfw
    assert rendered in (root / "README.md").read_text()


DATACOMP_BASELINES = ["none", "basic", "clip_l14_top30", "clip_b32_threshold_0.25", "basic_clip_l14_top30", "laion2b",
                      "text_based", "image_based", "datacomp_1b", "semantic_dedupe", "metaclip_balance"]  # fmt: skip


@pytest.mark.parametrize(
    ("saved", "strategies"),
    [
        ("2026-12-01-demo-sweep-3-pools", ["none", "dedupe", "clip_score_top70", "dfn_top70", "all_filters"]),
        ("2026-12-01-datacomp-baselines-3-pools", DATACOMP_BASELINES),
        ("2026-12-01-demo-search-3-pools", ["none", "clip_top-top_fraction=0.55", "clip_top-top_fraction=0.853"]),
    ],
)
def test_the_readmes_three_pool_sweep_table_is_the_one_the_sweep_wrote(saved: str, strategies: list[str]):
    """The README prints a sweep's results.md over three pools as the sweep wrote it, and the saved
    per-trial rows give its means: a figure edited by hand, or a table of another run, fails here."""
    import csv
    import statistics

    root = Path(__file__).parents[1]
    results = root / "benchmarks" / "results"
    table = (results / f"{saved}.md").read_text().strip()
    assert table in (root / "README.md").read_text()
    with (results / f"{saved}.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    expected = sorted((strategy, str(seed)) for strategy in strategies for seed in range(3))
    assert sorted((t["strategy"], t["seed"]) for t in trials) == expected
    for strategy in strategies:
        top1 = [float(t["zeroshot_top1"]) for t in trials if t["strategy"] == strategy]
        cell = f"{statistics.mean(top1):.3f} ± {statistics.stdev(top1):.3f}"
        assert f"| {strategy} | 3 | " in table and cell in table.split(f"| {strategy} | 3 | ")[1].split("\n")[0]


def test_the_threshold_rule_takes_the_highest_f1_and_keeps_as_the_filters_do():
    """benchmarks/report.py's rules on made-up sweeps (no run): the highest F1 averaged over the tuning
    pools wins, a tie goes to the threshold nearest the recipe's; the radius is the largest with mean
    precision >= 0.9; the chosen values become the scoring runs' settings. A sample without a score
    is dropped, nsfw keeps below."""
    report = load_benchmark("report")

    def pool(used: float, f1s: list[float], precisions: list[float]) -> dict:
        sweep = {str(t): {"f1": f} for t, f in zip((0.1, 0.2, 0.3, 0.4), f1s, strict=True)}
        radii = {str(k): {"dedupe_precision": p} for k, p in zip((0, 4, 8), precisions, strict=True)}
        return {"threshold_sweep": {"dfn": {"used": used, "index": 3, "sweep": sweep}}, "radius_sweep": radii}

    tied = [0.5, 0.7, 0.7, 0.6]
    assert report.chosen_threshold([pool(0.3, tied, [1, 1, 1])], "dfn") == 0.3
    assert report.chosen_threshold([pool(0.1, tied, [1, 1, 1])], "dfn") == 0.2
    # one pool prefers 0.4, the mean of three prefers 0.2; precision at radius 8 averages below 0.9
    pools = [pool(0.3, [0.5, 0.8, 0.6, 0.9], [1, 0.95, 0.95]), *[pool(0.3, [0.5, 0.8, 0.6, 0.6], [1, 0.9, 0.8])] * 2]
    assert report.chosen_threshold(pools, "dfn") == 0.2
    assert report.chosen_radius(pools) == 4
    assert report.chosen_settings(pools) == ["dedupe.max_distance=4", "filter.strategy.3.threshold=0.2"]
    scores = np.array([0.1, 0.5, np.nan, 0.9])
    assert report.threshold_keep("aesthetic", scores, 0.5).tolist() == [False, True, False, True]
    assert report.threshold_keep("nsfw", scores, 0.5).tolist() == [True, False, False, False]


def test_cpu_by_process_names_a_starting_ray_worker_by_what_it_runs_not_by_the_raylet_it_names():
    """A Ray worker's command line mentions the raylet's socket: counting it as the raylet put the
    start-up of every worker process under "raylet" (until 2026-12-01)."""
    kind = load_benchmark("cpu_by_process").kind_of_command
    venv = "/w/.venv/lib/python3.11/site-packages/ray"
    worker = (
        f"/w/.venv/bin/python -u {venv}/_private/workers/default_worker.py --node-ip-address=127.0.0.1"
        " --raylet-name=/tmp/ray/session_1/sockets/raylet --gcs-address=127.0.0.1:6379 --worker-type=WORKER"
    )
    assert kind(worker) == "default_worker.py (a Ray worker starting)"
    assert kind(f"{venv}/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s/sockets/raylet") == "raylet"
    assert kind(f"{venv}/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray/s/logs") == "gcs_server"
    assert kind(f"/w/.venv/bin/python -u {venv}/_private/log_monitor.py --session-dir=/tmp/raylet") == "log_monitor"
    assert kind("ray::RayTrainWorker.run_train_fn") == "ray::RayTrainWorker"
    assert kind("/w/.venv/bin/python -m pipeline run demo --set output_dir=/tmp/pytest/raylet") == "-m pipeline"
    assert kind("", "kworker/0:1") == "[kworker/0:1]"
