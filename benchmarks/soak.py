"""Random-kill soak: kill a demo run at seeded-random instants in every stage, resume until it finishes.

Each kill point is either a random instant inside a stage (drawn along the stage timeline of an
uninterrupted reference run) or an event that catches a writer mid-write: a new Ray Train
checkpoint folder appearing (checkpoint persistence), a `.partial` file in the download shards
while an earlier shard is finished (shard write), an MLflow checkpoint artifact appearing
(artifact upload). The whole process group
gets SIGKILL (power-cut semantics, Ray's daemons too) or SIGINT (Ctrl-C). Then `pipeline resume`
runs again, and is killed again, until every kill point is spent; the last resume must finish.

Pass when: no resume failed on its own; the finished run's manifests (counts and reasons), kept
uids and training steps equal the reference's; every file under the run folder opens (tars list,
parquet reads, checkpoints load); MLflow has no run left RUNNING.

    python benchmarks/soak.py --kills 100 --seed 0 --json soak.json     # the long version (by hand)

The bounded version runs in CI (tests/test_crash_consistency.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STAGES = [
    *("demo_pool", "download", "phash", "dedupe", "seed_models", "embed"),
    *("heads", "filter", "subset", "train", "evaluate"),
]
# the chain without models (no seed training, embedding, heads or filter): the writer events are all in
# it, at well under half the time; CI soaks this one, `--chain model_free` here
MODEL_FREE = ["demo_pool", "download", "phash", "dedupe", "subset", "train", "evaluate"]
EVENTS = ("checkpoint_persist", "shard_write", "artifact_upload")
RUN = "soak"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def soak_overrides(output_dir: Path, ray_temp: str, port: int, stages: list[str] = STAGES) -> list[str]:
    """A small demo chain with every stage and tiny models: a few minutes on 2 cores. The demo's
    urls (and so its uids) name the server's port: the reference and the soaked runs share one."""
    return [
        f"output_dir={output_dir}",
        f"source.demo.port={port}",
        f"ray.temp_dir={ray_temp}",
        "ray.dashboard=false",
        "stages=[" + ", ".join(stages) + "]",
        "source.demo.n_samples=160",
        "source.demo.n_eval=30",
        "download.samples_per_shard=40",
        "seed_models.train.samples_seen=128",
        "seed_models.train.batch_size=32",
        "seed_models.train.checkpoint_every_samples=64",
        "seed_models.train.threads_per_worker=1",
        "seed_models.dfn=false",  # one seed model, not two: the soak's time goes to kills, not to training
        "filter.strategy=[{name: dedupe}, {name: basic, min_image_side: 32}, {name: clip_score, top_fraction: 0.7},"
        " {name: aesthetic, threshold: 5.0}, {name: nsfw, backend: head, threshold: 0.5}]",
        "heads.epochs=50",
        "embed.batch_size=64",
        "subset.samples_per_shard=40",
        "train.samples_seen=256",
        "train.batch_size=32",
        "train.workers=1",
        "train.threads_per_worker=1",
        "train.checkpoint_every_samples=64",
        "train.mlflow_checkpoint_every=1",  # so that a kill can land mid-upload (the artifact_upload event)
        "train.log_every_steps=1",
    ]


@dataclass(frozen=True)
class KillPoint:
    stage: str  # the stage to kill in (or, once an earlier kill moved past it, the stage then running)
    fraction: float  # how far into that stage, as a fraction of its duration in the reference run
    event: str  # one of EVENTS, or "" for a timed kill
    signal: str  # "KILL" (the process group) or "INT" (Ctrl-C)


@dataclass
class Attempt:
    kill: KillPoint | None
    killed: bool
    returncode: int | None
    seconds: float
    where: str  # the stage running when it ended
    error: str = ""
    exit_after_kill: float = 0.0  # seconds from the signal to the process's exit
    console: list[str] = field(default_factory=list)  # what the attempt printed (stdout and stderr)


@dataclass
class SoakReport:
    kills: int
    seed: int
    attempts: list[Attempt] = field(default_factory=list)
    failed_resumes: int = 0
    mismatches: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    running_mlflow_runs: int = 0
    ignored_interrupts: int = 0
    runs: int = 0  # soaked runs that finished and were checked
    reference_seconds: float = 0.0
    soak_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        finished = self.runs > 0 and self.attempts[-1].returncode == 0
        problems = self.failed_resumes or self.ignored_interrupts or self.mismatches or self.unreadable
        return finished and not (problems or self.running_mlflow_runs)

    def summary(self) -> str:
        by_stage: dict[str, int] = {}
        for a in self.attempts:
            if a.killed:
                by_stage[a.where] = by_stage.get(a.where, 0) + 1
        spread = ", ".join(f"{k}:{v}" for k, v in by_stage.items())
        return (
            f"{'PASS' if self.passed else 'FAIL'}: {sum(a.killed for a in self.attempts)} kills ({spread}) "
            f"over {self.runs} finished run(s), "
            f"{self.failed_resumes} failed resumes, {self.ignored_interrupts} ignored Ctrl-C, "
            f"{len(self.mismatches)} mismatches, "
            f"{len(self.unreadable)} unreadable files, {self.running_mlflow_runs} MLflow runs left RUNNING; "
            f"reference {self.reference_seconds:.0f} s, soak {self.soak_seconds:.0f} s"
        )


def plan_kills(
    n: int, seed: int, stage_seconds: dict[str, float], events: bool = True, signals: dict[str, str] | None = None
) -> list[KillPoint]:
    """n kill points in run order: one per event kind, the rest at uniform instants of the reference timeline
    (`stage_seconds`, in run order: its stages are the soaked chain's). `signals` fixes an event's
    signal ("KILL" or "INT"); the others are drawn."""
    rng = random.Random(seed)
    order = list(stage_seconds)
    kinds = ["KILL", "INT"]
    points: list[tuple[int, float, KillPoint]] = []
    event_stage = {"shard_write": "download", "checkpoint_persist": "train", "artifact_upload": "train"}
    chosen_events = list(EVENTS[: min(n, len(EVENTS))]) if events else []
    for event in chosen_events:
        stage = event_stage[event]
        drawn = rng.choice(kinds)  # drawn even when fixed, so that the rest of the plan stays the seed's
        points.append((order.index(stage), -1.0, KillPoint(stage, 0.0, event, (signals or {}).get(event, drawn))))
    total = sum(stage_seconds.values())
    for _ in range(n - len(chosen_events)):
        instant, stage = rng.uniform(0, total), order[-1]
        for name in order:
            if instant < stage_seconds.get(name, 0.0):
                stage = name
                break
            instant -= stage_seconds.get(name, 0.0)
        fraction = instant / max(stage_seconds.get(stage, 0.0), 1e-9)
        points.append((order.index(stage), fraction, KillPoint(stage, fraction, "", rng.choice(kinds))))
    return [p for _, _, p in sorted(points, key=lambda t: (t[0], t[1]))]


def _env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


class RunProcess:
    """`python -m pipeline ...` in its own process group; its stdout lines are timestamped as they come.

    The console prints `[stage] ...` when a stage ends (or is skipped as finished earlier), so a stage
    starts when the one before it in `chain` prints, and the first when the run prints its folder."""

    def __init__(self, args: list[str], log_path: Path, chain: list[str]):
        self.chain = chain
        self.log = log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
            start_new_session=True,
        )
        self.started_stages: dict[str, float] = {}
        self.current = "startup"
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines.append(line.rstrip())
            if line.startswith("run directory:"):
                self._starts(self.chain[0])
            elif line.startswith("[") and "]" in line and line[1 : line.index("]")] in self.chain:
                ended = self.chain.index(line[1 : line.index("]")])
                self._starts(self.chain[ended + 1] if ended + 1 < len(self.chain) else "finishing")

    def _starts(self, stage: str) -> None:
        self.started_stages.setdefault(stage, time.monotonic())
        self.current = stage

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self, how: str, ray_temp: str) -> None:
        """KILL: a power cut, so Ray's workers die first (no task may finish after the driver);
        INT: Ctrl-C, which a terminal sends to the foreground process group only."""
        if how == "KILL":
            kill_ray_of(ray_temp)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if how == "KILL" else signal.SIGINT)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a Ctrl-C that did not end it: what a user does next
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        self.log.close()
        return code


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def kill_ray_of(temp_dir: str) -> None:
    """SIGKILL the local Ray cluster that uses `temp_dir`: its daemons name the dir on their command
    line; its workers (renamed `ray::...`) are found as their descendants. They start their own
    sessions, so a process-group kill of the run misses them."""
    roots = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and temp_dir in (entry / "cmdline").read_bytes().decode(errors="replace"):
                roots.append(int(entry.name))
        except OSError:
            continue
    tree, doomed = _children(), []
    while roots:
        pid = roots.pop()
        doomed.append(pid)
        roots.extend(tree.get(pid, []))
    for pid in reversed(doomed):  # workers before their raylet: none finishes a task after the driver is gone
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "train" / "ray").glob("attempt-*/checkpoint_*") if p.is_dir()]


def _event_seen(event: str, run_dir: Path, before: set[str]) -> bool:
    """A writer is mid-write right now: a new checkpoint folder, a partial shard, a new MLflow artifact."""
    if event == "checkpoint_persist":
        return any(str(p) not in before for p in _checkpoint_dirs(run_dir))
    if event == "shard_write":  # with an earlier shard finished: the resume must skip it, not fetch it again
        shards = run_dir / "download" / "shards"
        return any(shards.glob(".*.partial")) and any(shards.glob("*_stats.json"))
    if event == "artifact_upload":
        root = run_dir.parent / "mlartifacts"
        return any(str(p) not in before for p in root.glob("**/artifacts/checkpoints/step_*"))
    raise ValueError(event)


def _existing(event: str, run_dir: Path) -> set[str]:
    if event == "checkpoint_persist":
        return {str(p) for p in _checkpoint_dirs(run_dir)}
    if event == "artifact_upload":
        return {str(p) for p in (run_dir.parent / "mlartifacts").glob("**/artifacts/checkpoints/step_*")}
    return set()


def _stage_finished(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / "manifest.json").exists()


def run_until_killed(
    args: list[str],
    point: KillPoint,
    run_dir: Path,
    log_path: Path,
    ray_temp: str,
    reference_seconds: dict[str, float],
    timeout: float,
) -> Attempt:
    started = time.monotonic()
    before = _existing(point.event, run_dir) if point.event else set()
    # an earlier kill may have moved past the planned stage: then the first stage still unfinished
    order = list(reference_seconds)
    later = order[order.index(point.stage) :]
    target = next((stage for stage in later if not _stage_finished(run_dir, stage)), point.stage)
    offset = point.fraction * reference_seconds.get(target, 0.0)
    run = RunProcess(args, log_path, list(reference_seconds))
    killed = False
    deadline = started + timeout
    while run.running() and time.monotonic() < deadline:
        if point.event:
            killed = _event_seen(point.event, run_dir, before)
        else:
            began = run.started_stages.get(target)
            killed = began is not None and time.monotonic() - began >= offset
        # a resumed stage can finish sooner than the reference's: then kill as the next one starts
        killed = killed or (_stage_finished(run_dir, target) and run.current != target)
        if killed:
            where = run.current
            run.kill(point.signal, ray_temp)
            signalled = time.monotonic()
            break
        time.sleep(0.01 if point.event else 0.05)
    else:
        where = run.current
    code = run.wait(timeout=120)
    error = "" if killed or code == 0 else "\n".join(run.lines[-15:])
    after = time.monotonic() - signalled if killed else 0.0
    return Attempt(point, killed, code, time.monotonic() - started, where, error, after, run.lines)


def _comparable(manifest: dict) -> dict:
    return {k: manifest[k] for k in ("in", "kept", "dropped", "failed")}


def _uids(run_dir: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    from stages.shards import read_decisions

    found = {}
    for stage in ("dedupe", "filter"):
        if not (run_dir / stage / "decisions").exists():
            continue  # not in this chain
        table = read_decisions(run_dir / stage / "decisions", ["uid", "keep", "reason"])
        found[stage] = sorted(zip(*(table.column(c).to_pylist() for c in ("uid", "keep", "reason")), strict=True))
    shards = sorted((run_dir / "subset" / "shards").glob("*.parquet"))
    found["subset"] = sorted(u for p in shards for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist())
    return found


def compare_runs(reference: Path, soaked: Path) -> list[str]:
    """What differs between the finished soaked run and the uninterrupted reference."""
    problems = []
    for stage in stage_seconds(reference):
        ref = json.loads((reference / stage / "manifest.json").read_text())
        got = json.loads((soaked / stage / "manifest.json").read_text())
        if _comparable(ref) != _comparable(got):
            problems.append(f"{stage}: {_comparable(got)} != reference {_comparable(ref)}")
    ref_train = json.loads((reference / "train" / "manifest.json").read_text())["metrics"]
    got_train = json.loads((soaked / "train" / "manifest.json").read_text())["metrics"]
    if ref_train["steps"] != got_train["steps"]:
        problems.append(f"train steps {got_train['steps']} != reference {ref_train['steps']}")
    ref_uids, got_uids = _uids(reference), _uids(soaked)
    for key in ref_uids:
        if ref_uids[key] != got_uids[key]:
            problems.append(f"{key}: kept uids differ from the reference")
    return problems


def unreadable_files(run_dir: Path) -> list[str]:
    """Every tar lists, every parquet/json reads, every checkpoint and model loads; partial names are ignored."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.atomic import is_partial
    from stages.train import STATE_FILE, checkpoint_problem

    bad = []
    for path in sorted(run_dir.rglob("*")):
        if not path.is_file() or any(is_partial(Path(part)) for part in path.relative_to(run_dir).parts):
            continue
        try:
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    tar.getmembers()
            elif path.suffix == ".parquet":
                pq.read_table(path)
            elif path.suffix == ".json" and "/ray/" not in str(path):
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                [json.loads(line) for line in path.read_text().splitlines()]
            elif path.name == STATE_FILE:
                problem = checkpoint_problem(path.parent)
                if problem:
                    raise ValueError(problem)
            elif path.suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to open is the finding
            bad.append(f"{path.relative_to(run_dir)}: {type(err).__name__}: {str(err)[:120]}")
    return bad


def running_mlflow_runs(output_dir: Path) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{output_dir / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments, "attributes.status = 'RUNNING'"))


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Each stage's seconds, in run order, for the stages the run has."""
    found = [s for s in STAGES if (run_dir / s / "manifest.json").exists()]
    return {s: json.loads((run_dir / s / "manifest.json").read_text())["seconds"] for s in found}


def reference_run(workdir: Path, port: int, stages: list[str], timeout: float = 900) -> tuple[Path, float]:
    """The uninterrupted run every soaked run must equal."""
    output = workdir / "reference"
    ray_temp = tempfile.mkdtemp(prefix="rsr", dir="/tmp")
    started = time.monotonic()
    overrides = soak_overrides(output, ray_temp, port, stages)
    args = ["run", "demo", "--run-name", RUN, *[a for o in overrides for a in ("--set", o)]]
    try:
        run = RunProcess(args, workdir / "reference.log", stages)
        code = run.wait(timeout=timeout)
    finally:
        kill_ray_of(ray_temp)
    if code != 0:
        raise RuntimeError(f"the reference run failed (exit {code}); see {workdir / 'reference.log'}")
    return output / RUN, time.monotonic() - started


def run_cycle(
    points: list[KillPoint],
    output: Path,
    workdir: Path,
    port: int,
    reference_seconds: dict[str, float],
    report: SoakReport,
    log,
    after_kill=None,
) -> tuple[Path | None, int]:
    """One soaked run: killed at `points` in order, then resumed until it finishes.

    Returns its folder (None if it never finished) and how many points it used: a run can finish
    before all are reached, and the rest go to the next run. `after_kill(attempt, run_dir)` is
    called after each kill, before the resume: the run folder as the user finds it."""
    run_dir = output / RUN
    ray_temp = tempfile.mkdtemp(prefix="rsk", dir="/tmp")
    overrides = soak_overrides(output, ray_temp, port, list(reference_seconds))
    first = ["run", "demo", "--run-name", RUN, *[a for o in overrides for a in ("--set", o)]]
    resume = ["resume", str(run_dir)]
    finished, consumed = False, 0
    try:
        for point in points:
            if all(_stage_finished(run_dir, stage) for stage in reference_seconds):
                break  # nothing left to interrupt: the rest go to the next run
            consumed += 1
            args = resume if (run_dir / "run.json").exists() else first
            attempt = run_until_killed(
                args, point, run_dir, workdir / "soak.log", ray_temp, reference_seconds, timeout=600
            )
            kill_ray_of(ray_temp)
            report.attempts.append(attempt)
            if not attempt.killed and attempt.returncode != 0:
                report.failed_resumes += 1
                log(f"the resume FAILED on its own (exit {attempt.returncode}):\n{attempt.error}")
            elif attempt.killed and attempt.returncode == 0 and attempt.exit_after_kill > 5:
                report.ignored_interrupts += 1  # Ctrl-C did not stop the run: it went on to finish
                log(f"SIG{point.signal} in {attempt.where} was IGNORED: the run went on and finished")
            elif attempt.killed:
                n = sum(a.killed for a in report.attempts)
                log(f"kill {n}: SIG{point.signal} in {attempt.where} ({point.event or f'{point.fraction:.0%} in'})")
                if after_kill is not None:
                    after_kill(attempt, run_dir)
            finished = attempt.returncode == 0  # a signal that came as it was finishing changes nothing
            if finished:
                break  # done before this kill point came: the rest go to the next run
        while not finished and report.failed_resumes < 3:
            args = resume if (run_dir / "run.json").exists() else first
            final = RunProcess(args, workdir / "soak.log", list(reference_seconds))
            code = final.wait(timeout=900)
            kill_ray_of(ray_temp)
            error = "\n".join(final.lines[-15:])
            report.attempts.append(Attempt(None, False, code, 0.0, final.current, error, console=final.lines))
            finished = code == 0
            if not finished:
                report.failed_resumes += 1
                log(f"the final resume FAILED (exit {code}):\n{report.attempts[-1].error}")
    finally:
        kill_ray_of(ray_temp)
    return (run_dir if finished else None), consumed


def drop_bulk(run_dir: Path) -> None:
    """A checked run's checkpoints and MLflow artifacts: hundreds of MB a run, read by no comparison,
    and a CI disk with a few GB free must hold the reference and a soaked run at once."""
    import shutil

    for folder in [*run_dir.rglob("ray"), run_dir.parent / "mlartifacts"]:
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def soak(
    kills: int,
    seed: int,
    workdir: Path,
    reference: Path | None = None,
    log=print,
    stages: list[str] = STAGES,
    signals: dict[str, str] | None = None,
    after_kill=None,
) -> SoakReport:
    """Kill soaked runs `kills` times in all; a run that finishes before its kill points are spent
    is checked, and the rest are drawn afresh for a new run. `stages`: the chain (a given reference's
    own); `signals`: a fixed signal per writer event (see `plan_kills`); `after_kill`: see `run_cycle`."""
    workdir.mkdir(parents=True, exist_ok=True)
    report = SoakReport(kills=kills, seed=seed)
    if reference is None:
        port = free_port()
        reference, report.reference_seconds = reference_run(workdir, port, stages)
        drop_bulk(reference)  # what the comparisons read (manifests, decisions) stays
        log(f"reference run: {report.reference_seconds:.0f} s")
    else:
        port = int(json.loads((reference / "demo_pool" / "pool.json").read_text())["base_url"].rsplit(":", 1)[1])
    reference_seconds = stage_seconds(reference)
    started = time.monotonic()
    points = plan_kills(kills, seed, reference_seconds, signals=signals)
    cycle = 0
    while sum(a.killed for a in report.attempts) < kills and report.failed_resumes == 0:
        if not points:  # some kill points were reached by no running run: draw the missing ones
            missing = kills - sum(a.killed for a in report.attempts)
            points = plan_kills(missing, seed + 1000 * cycle, reference_seconds, events=False)
        output = workdir / f"soaked-{cycle}"
        run_dir, consumed = run_cycle(points, output, workdir, port, reference_seconds, report, log, after_kill)
        points = points[consumed:]
        if run_dir is None:
            break
        report.runs += 1
        report.mismatches += [f"run {cycle}: {m}" for m in compare_runs(reference, run_dir)]
        report.unreadable += [f"run {cycle}: {f}" for f in unreadable_files(run_dir)]
        report.running_mlflow_runs += running_mlflow_runs(run_dir.parent)
        drop_bulk(run_dir)
        log(f"run {cycle} finished and checked: {report.summary()}")
        cycle += 1
    report.soak_seconds = time.monotonic() - started
    log(report.summary())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chain", choices=["full", "model_free"], default="full", help="full: all 11 stages")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    report = soak(args.kills, args.seed, workdir, stages=STAGES if args.chain == "full" else MODEL_FREE)
    if args.json:
        record = {
            "name": "soak",
            "passed": report.passed,
            "summary": report.summary(),
            "params": {"kills": args.kills, "seed": args.seed, "chain": args.chain},
            "reference_seconds": report.reference_seconds,
            "soak_seconds": report.soak_seconds,
            "finished_runs": report.runs,
            "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
            "attempts": [{k: v for k, v in asdict(a).items() if k != "console"} for a in report.attempts],
            "mismatches": report.mismatches,
            "unreadable": report.unreadable,
        }
        args.json.write_text(json.dumps(record, indent=2))
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
