"""The README's demo tables, regenerated: the demo at several seeds, tabulated with their spread.

    .venv/bin/python benchmarks/report.py --seeds 0 1 2 --out report.md --json report.json
    .venv/bin/python benchmarks/report.py --render report.json        # the markdown again, from the JSON

Each scoring seed S runs `python -m pipeline run demo` in a process of its own, with S seeding the
pool (`source.demo.seed`), the reference CLIP and filtering network (`seed_models.train.seed`), the
heads (`heads.seed`) and the trained model (`train.seed`). A run already under `--dir` is resumed
(the CLI refuses one whose recipe differs, and skips the stages it finished). The tuning seeds
(`--tune-seeds`, pools none of the scoring seeds make) run first, the demo up to `filter` each: the
dedupe radius rule (the largest radius with mean precision >= 0.9) and the filter-threshold rule
(the highest mean F1 against the planted defects) are applied over them, and the scoring runs then
use the radius and thresholds chosen (`--keep-recipe`: the recipe's own, only compared).

The markdown holds: the command, date, the commit the runs were started at and the machine; the
first scoring run's console lines (rebuilt from its manifests: the `[stage] in= kept= ...` line
each stage prints when it ends); then, over the scoring runs, mean ± sample std (min-max) of each
stage's counts, the filters' precision and recall against the planted defects on the split no
seed model or head was fitted on, the dedupe radius and filter threshold sweeps, and the evaluation. About 9
minutes a scoring seed and 5 a tuning pool on 2 CPU cores (2026-12-01).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark_result import machine  # noqa: E402

from pipeline.manifest import Manifest  # noqa: E402
from pipeline.mapping import local_map  # noqa: E402

DEMO_STAGES = ["demo_pool", "download", "phash", "dedupe", "seed_models", "embed", "heads", "filter", "subset",
               "train", "evaluate"]  # fmt: skip
TUNE_STAGES = DEMO_STAGES[: DEMO_STAGES.index("filter") + 1]  # no subset, training or evaluation
RADII = (0, 2, 4, 6, 8)
THRESHOLDS = {  # the candidates for each thresholded filter of the demo's strategy: wide enough for an inner best
    "dfn": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5),
    "aesthetic": (3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0),
    "nsfw": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
}
KEEPS_BELOW = {"nsfw"}  # drops scores at or above its threshold; the others keep scores at or above theirs
EVAL_KEYS = {
    "zeroshot_top1": "zero-shot top-1",
    "zeroshot_top5": "zero-shot top-5",
    "zeroshot_chance": "zero-shot chance",
    "image_to_text_recall_at_1": "image→text R@1",
    "image_to_text_recall_at_10": "image→text R@10",
    "text_to_image_recall_at_1": "text→image R@1",
    "retrieval_chance_recall_at_1": "retrieval chance R@1",
}
DEDUPE_KEYS = {
    "dedupe_precision": "precision",
    "dedupe_recall": "recall",
    "dedupe_recall_exact": "exact",
    "dedupe_recall_resized": "resized",
    "dedupe_recall_reencoded": "re-encoded",
    "dedupe_recall_cropped": "cropped",
    "eval_leak_precision": "eval-leak P",
    "eval_leak_recall": "eval-leak R",
}


# ---- running ------------------------------------------------------------------------------


def seed_settings(seed: int) -> list[str]:
    """Every seed a demo run has follows `seed` (multi-threaded CPU training is still not
    bit-reproducible: the same seed twice differs a little)."""
    keys = ("source.demo.seed", "seed_models.train.seed", "heads.seed", "train.seed")
    return [f"{key}={seed}" for key in keys]


def run_command(name: str, root: Path, settings: list[str], resume: bool) -> list[str]:
    command = [sys.executable, "-m", "pipeline", "run", "demo", "--run-name", name]
    for setting in [f"output_dir={root}", *settings]:
        command += ["--set", setting]
    return command + (["--resume"] if resume else [])


def ensure_run(name: str, root: Path, settings: list[str], last_stage: str) -> tuple[Path, str]:
    """The run `root/name` made by the CLI, or an earlier one resumed (the CLI refuses it if its
    recipe differs, and skips the stages it finished); with the commit it was started at."""
    run_dir, stamp = root / name, root / f"{name}.commit"
    resume = (run_dir / "run.json").exists()
    if not resume or not stamp.exists():
        stamp.write_text(commit())
    command = run_command(name, root, settings, resume)
    print(f"{name}: {shlex.join(command[1:])}", flush=True)
    console = root / f"{name}.console.txt"
    with console.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code or Manifest.read(run_dir / last_stage) is None:
        tail = console.read_text().splitlines()[-15:]
        raise SystemExit(f"{name}: the run failed (exit {code}); its console is {console}:\n" + "\n".join(tail))
    return run_dir, stamp.read_text().strip()


# ---- reading a run --------------------------------------------------------------------------


def read_run(run_dir: Path, stages: list[str]) -> dict:
    """The counts, seconds and metrics of a run's finished stages, in stage order (not their
    output paths: the saved results name no folder of this machine), and its dedupe radius."""
    manifests = {}
    for stage in stages:
        manifest = Manifest.read(run_dir / stage)
        if manifest is not None:
            manifests[stage] = manifest.model_dump(by_alias=True, exclude={"outputs"})
    radius = json.loads((run_dir / "run.json").read_text())["recipe"]["dedupe"]["max_distance"]
    return {"run": run_dir.name, "manifests": manifests, "dedupe_k": radius}


def radius_sweep(run_dir: Path, radii=RADII) -> dict[str, dict[str, float]]:
    """Dedupe quality against the planted copies at each radius, on a run's hashes (in this process)."""
    import pyarrow.parquet as pq

    from stages.dedupe import DedupeConfig, dedupe_pool, hash_eval_sets
    from stages.demo_truth import dedupe_quality
    from stages.shards import read_decisions

    pool = Manifest.read(run_dir / "demo_pool").outputs
    hashes = Path(Manifest.read(run_dir / "phash").outputs["hashes_dir"])
    truth = pq.read_table(pool["ground_truth"])
    recipe = json.loads((run_dir / "run.json").read_text())["recipe"]["dedupe"]
    eval_sets = [*recipe.get("eval_sets", []), str(Path(pool["eval_dir"]) / "*.tar")]  # as the stage adds it
    eval_keys, eval_hashes = hash_eval_sets(eval_sets)  # once, not once per radius
    out = {}
    with tempfile.TemporaryDirectory(prefix="radius-") as scratch:
        for k in radii:
            config = DedupeConfig.model_validate({**recipe, "max_distance": k, "eval_sets": eval_sets})
            manifest = dedupe_pool(hashes, config, Path(scratch) / f"k{k}", local_map, eval_keys, eval_hashes)
            out[str(k)] = dedupe_quality(read_decisions(manifest.outputs["decisions"]), truth)
    return out


def threshold_keep(name: str, scores: np.ndarray, threshold: float) -> np.ndarray:
    """What a thresholded filter keeps at `threshold` (a sample without a score is dropped, as the
    filters do)."""
    with np.errstate(invalid="ignore"):
        keep = scores < threshold if name in KEEPS_BELOW else scores >= threshold
    return keep & ~np.isnan(scores)


def threshold_sweep(run_dir: Path, candidates: dict = THRESHOLDS) -> dict[str, dict]:
    """Each thresholded filter's precision, recall and F1 against the planted defects at each
    candidate threshold, from the scores the run's filter stage recorded, on the split it scores
    (in this process). At the run's own threshold the keeps must be the stage's: checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.demo_truth import filter_quality
    from stages.shards import read_decisions

    pool = Manifest.read(run_dir / "demo_pool").outputs
    truth = pq.read_table(pool["ground_truth"])
    labelled = set(pq.read_table(pool["labels"], columns=["uid"]).column("uid").to_pylist())
    decisions = read_decisions(Manifest.read(run_dir / "filter").outputs["decisions"])
    strategy = json.loads((run_dir / "run.json").read_text())["recipe"]["filter"]["strategy"]
    out = {}
    for column in decisions.column_names:
        label = column.removeprefix("score_")
        index, name = label.split("_", 1) if column.startswith("score_") else ("", "")
        if name not in candidates:
            continue
        scores, kept = decisions.column(column).to_numpy(zero_copy_only=False).astype(float), f"keep_{label}"
        used = float(strategy[int(index)]["threshold"])
        if not np.array_equal(threshold_keep(name, scores, used), decisions.column(kept).to_numpy()):
            raise SystemExit(f"{run_dir.name}: {label} at its threshold {used} does not keep what the stage kept")
        rows = {}
        for threshold in sorted({*candidates[name], used}):
            keep = pa.array(threshold_keep(name, scores, threshold))
            table = pa.table({"uid": decisions.column("uid"), "reason": decisions.column("reason"), kept: keep})
            q = filter_quality(table, truth, exclude=labelled)
            p, r = q[f"{label}.precision"], q[f"{label}.recall"]
            rows[str(threshold)] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
        out[name] = {"used": used, "index": int(index), "sweep": rows}
    return out


# ---- tables ----------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 2) -> str:
    """mean ± sample std (min-max); one value, or the same in every run, as it is; `[n of N]` when
    only n of the N runs have the figure."""
    v = np.asarray([x for x in values if x is not None], float)
    if len(v) == 0:
        return "–"
    some = f" [{len(v)} of {len(values)}]" if len(v) < len(values) else ""
    if len(v) == 1 or v.min() == v.max():
        return f"{v[0]:.{digits}f}{some}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f} ({v.min():.{digits}f}–{v.max():.{digits}f}){some}"


def transcript(run: dict) -> list[str]:
    return [f"[{stage}] {Manifest.model_validate(m).summary()}" for stage, m in run["manifests"].items()]


def counts_table(runs: list[dict]) -> list[str]:
    """Per stage: in, kept and every dropped or failed reason, over the runs (a reason a run did not
    have counts 0 there); and its seconds."""
    lines = ["| stage | in | kept | dropped / failed (reason: count) | seconds |", "|---|---|---|---|---|"]
    for stage in runs[0]["manifests"]:
        ms = [r["manifests"][stage] for r in runs if stage in r["manifests"]]
        reasons = sorted({(kind, reason) for m in ms for kind in ("dropped", "failed") for reason in m[kind]})
        detail = "; ".join(
            f"{kind} {reason}: {spread([m[kind].get(reason, 0) for m in ms], 0)}" for kind, reason in reasons
        )
        lines.append(
            f"| {stage} | {spread([m['in'] for m in ms], 0)} | {spread([m['kept'] for m in ms], 0)} | {detail or '–'} "
            f"| {spread([m['seconds'] for m in ms], 0)} |"
        )
    return lines


def filter_table(runs: list[dict]) -> list[str]:
    from stages.demo_truth import FILTER_TARGETS

    metrics = [r["manifests"]["filter"]["metrics"] for r in runs if "filter" in r["manifests"]]
    steps = sorted(
        {k.rsplit(".", 1)[0] for k in metrics[0] if k.endswith(".precision")}, key=lambda s: int(s.split("_")[0])
    )
    lines = [
        "| step | catches (planted) | targets | precision | chance precision | recall |",
        "|---|---|---|---|---|---|",
    ]
    for step in steps:
        name = step.split("_", 1)[1]
        row = [spread([m[f"{step}.{key}"] for m in metrics], 0 if key == "targets" else 2)
               for key in ("targets", "precision", "prevalence", "recall")]  # fmt: skip
        lines.append(f"| `{name}` | {', '.join(sorted(FILTER_TARGETS[name]))} | " + " | ".join(row) + " |")
    return lines


def pools_named(tunes: list[dict]) -> str:
    seeds = ", ".join(str(t["seed"]) for t in tunes)
    return f"the tuning pool (seed {seeds})" if len(tunes) == 1 else f"the {len(tunes)} tuning pools (seeds {seeds})"


def sweep_table(tunes: list[dict], scoring: list[dict]) -> list[str]:
    lines = [
        "| k | pool | " + " | ".join(DEDUPE_KEYS.values()) + " |",
        "|---|---|" + "---|" * len(DEDUPE_KEYS),
    ]
    for k in tunes[0]["radius_sweep"]:
        for label, runs in (("tuning", tunes), ("scoring", scoring)):
            cells = [spread([r["radius_sweep"][k].get(key) for r in runs]) for key in DEDUPE_KEYS]
            lines.append(f"| {k} | {label} | " + " | ".join(cells) + " |")
    return lines


def chosen_radius(tunes: list[dict], min_precision: float = 0.9) -> int | None:
    """The largest radius whose precision, averaged over the tuning pools, is at least
    `min_precision`: as many copies as can be caught while nine drops in ten are real copies (None:
    no radius is)."""
    radii = tunes[0]["radius_sweep"]
    precision = {k: np.mean([t["radius_sweep"][k]["dedupe_precision"] for t in tunes]) for k in radii}
    ok = [int(k) for k, p in precision.items() if p >= min_precision]
    return max(ok) if ok else None


def verdict(chosen: float | None, used: float) -> str:
    return "the same" if chosen == used else "NOT the one the runs used"


def radius_line(tunes: list[dict], runs: list[dict]) -> str:
    chosen, used = chosen_radius(tunes), runs[0]["dedupe_k"]
    mean = "mean precision over them" if len(tunes) > 1 else "precision"
    return (
        f"Dedupe radius: on {pools_named(tunes)}, the largest k with {mean} ≥ 0.9 is "
        f"{chosen}; the scoring runs used k = {used}: {verdict(chosen, used)}. The sweep on both:"
    )


def chosen_threshold(tunes: list[dict], name: str) -> float:
    """The threshold with the highest F1, averaged over the tuning pools (a tie goes to the one
    nearest the recipe's): precision and recall weighed alike, and one pool's noise damped."""
    used = tunes[0]["threshold_sweep"][name]["used"]
    f1 = {float(t): np.mean([r["threshold_sweep"][name]["sweep"][t]["f1"] for r in tunes])
          for t in tunes[0]["threshold_sweep"][name]["sweep"]}  # fmt: skip
    return max(f1, key=lambda t: (f1[t], -abs(t - used)))


def chosen_settings(tunes: list[dict]) -> list[str]:
    """The recipe settings that make a run use the radius and thresholds the rules chose."""
    radius = chosen_radius(tunes)
    if radius is None:
        raise SystemExit(f"no dedupe radius has precision >= 0.9 on {pools_named(tunes)}: none to score with")
    settings = [f"dedupe.max_distance={radius}"]
    for name, entry in tunes[0]["threshold_sweep"].items():
        settings.append(f"filter.strategy.{entry['index']}.threshold={chosen_threshold(tunes, name):g}")
    return settings


def threshold_lines(tunes: list[dict], runs: list[dict]) -> list[str]:
    """Per thresholded filter: the rule's verdict, then its sweep on the tuning pools and the scoring pools."""
    lines = []
    best = "the highest mean F1 over them" if len(tunes) > 1 else "the highest F1"
    for name in tunes[0]["threshold_sweep"]:
        chosen, used = chosen_threshold(tunes, name), runs[0]["threshold_sweep"][name]["used"]
        lines.append(
            f"- `{name}`: on {pools_named(tunes)}, {best} is at {chosen:g}; the scoring runs used "
            f"{used:g}: {verdict(chosen, used)}."
        )
    lines += [
        "",
        "| filter | threshold | pool | precision | recall | F1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in tunes[0]["threshold_sweep"].items():
        for t in entry["sweep"]:
            for label, pools in (("tuning", tunes), ("scoring", runs)):
                cells = [spread([r["threshold_sweep"][name]["sweep"].get(t, {}).get(k) for r in pools]) for k in
                         ("precision", "recall", "f1")]  # fmt: skip
                lines.append(f"| `{name}` | {float(t):g} | {label} | " + " | ".join(cells) + " |")
    return lines


def eval_table(runs: list[dict]) -> list[str]:
    metrics = [r["manifests"]["evaluate"]["metrics"] for r in runs if "evaluate" in r["manifests"]]
    lines = ["| metric | value |", "|---|---|"]
    for key, label in EVAL_KEYS.items():
        if key in metrics[0]:
            lines.append(f"| {label} | {spread([m[key] for m in metrics], 3)} |")
    return lines


def render(report: dict) -> str:
    runs, tunes = report["runs"], report.get("tunes", [])
    seeds = ", ".join(str(r["seed"]) for r in runs)
    info = report["machine"]
    gpu = info["gpu"] or "no GPU"
    commits = ", ".join(sorted({r["commit"] for r in runs}))
    out = [
        f"Produced by `{report['command']}` on {info['cores']} cores ({info['cpu']}, {gpu}), "
        f"{info['date'][:10]}, runs started at commit {commits}: {len(runs)} demo run(s), seeds {seeds}. "
        "Cells: mean ± sample std (min–max) over the runs.",
        "",
        f"Console of the run at seed {runs[0]['seed']} (each stage's closing line):",
        "",
        "```",
        *transcript(runs[0]),
        "```",
        "",
        "Counts per stage:",
        "",
        *counts_table(runs),
    ]
    if "filter" in runs[0]["manifests"]:
        out += ["", "Filters against the planted defects, on the unlabelled 70% (no seed model or head saw it):", ""]
        out += filter_table(runs)
    if tunes:
        out += ["", radius_line(tunes, runs), "", *sweep_table(tunes, runs)]
    if tunes and tunes[0].get("threshold_sweep"):
        out += ["", f"Filter thresholds, chosen on {pools_named(tunes)} by the highest F1 against the planted defects:"]
        out += ["", *threshold_lines(tunes, runs)]
    if "evaluate" in runs[0]["manifests"]:
        out += ["", "The model trained on the filtered subset, on the held-out set:", "", *eval_table(runs)]
    return "\n".join(out) + "\n"


def commit() -> str:
    """The commit the runs were made at; `-dirty` when the tree had changes not committed."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def build(seeds: list[int], tune_seeds: list[int], root: Path, extra: list[str], keep_recipe: bool = False) -> dict:
    """The tuning pools first, then the scoring runs with what the rules chose on them (or, with
    `keep_recipe`, the recipe's own radius and thresholds)."""
    if set(tune_seeds) & set(seeds):
        raise SystemExit(f"--tune-seeds {tune_seeds} share a seed with --seeds: tune on pools that are not scored")
    root.mkdir(parents=True, exist_ok=True)
    tunes = []
    for seed in tune_seeds:
        settings = [*seed_settings(seed), *extra, f"stages=[{', '.join(TUNE_STAGES)}]"]
        run_dir, made_at = ensure_run(f"tune-{seed}", root, settings, TUNE_STAGES[-1])
        tune = {"seed": seed, "commit": made_at, **read_run(run_dir, TUNE_STAGES)}
        tunes.append({**tune, "radius_sweep": radius_sweep(run_dir), "threshold_sweep": threshold_sweep(run_dir)})
    chosen = chosen_settings(tunes) if tunes and not keep_recipe else []
    runs = []
    for seed in seeds:
        settings = [*seed_settings(seed), *extra, *chosen]
        run_dir, made_at = ensure_run(f"seed-{seed}", root, settings, DEMO_STAGES[-1])
        runs.append({"seed": seed, "commit": made_at, **read_run(run_dir, DEMO_STAGES)})
        runs[-1]["radius_sweep"] = radius_sweep(run_dir)
        runs[-1]["threshold_sweep"] = threshold_sweep(run_dir)
    return {"command": "", "machine": machine(), "runs": runs, "tunes": tunes, "chosen_settings": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="scoring pools (and model seeds)")
    parser.add_argument("--tune-seeds", "--tune-seed", dest="tune_seeds", type=int, nargs="*", default=[100, 101, 102],
                        help="the pools the radius and thresholds are chosen on (none: no tuning)")  # fmt: skip
    parser.add_argument("--keep-recipe", action="store_true", help="score the recipe's own radius and thresholds")
    parser.add_argument("--dir", default="runs/report", help="where the runs go (finished ones are reused)")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="extra recipe setting")
    parser.add_argument("--out", default=None, help="write the markdown here (else print it)")
    parser.add_argument("--json", default=None, help="write the per-run figures here")
    parser.add_argument("--render", default=None, help="only render the markdown of a JSON written before")
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text())
    else:
        report = build(args.seeds, args.tune_seeds, Path(args.dir).resolve(), args.settings, args.keep_recipe)
        report["command"] = shlex.join(["benchmarks/report.py", *sys.argv[1:]])
    markdown = render(report)
    if args.json and not args.render:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.out:
        Path(args.out).write_text(markdown)
        print(f"report: {args.out}")
    else:
        sys.stdout.write(markdown)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
