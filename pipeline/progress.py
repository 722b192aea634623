"""Live progress a run leaves on disk, so `pipeline status` can show it from another shell.

A running pipeline writes `driver.json` (its pid and host) in the run folder, and each stage that
fans out tasks writes `<stage>/progress.json` (tasks done of total, samples, rate) at most once a
second (training: steps done of total, loss, samples/s, from its rank 0). The files are written
atomically: a reader sees the last whole state, never a torn one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.atomic import write_json

DRIVER_FILE = "driver.json"
PROGRESS_FILE = "progress.json"


@contextmanager
def driver_marker(run_dir: Path):
    """`driver.json` while this process runs the pipeline; removed when it ends (a kill leaves it,
    and `driver_alive` then finds its pid gone)."""
    path = run_dir / DRIVER_FILE
    write_json(path, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def driver_alive(run_dir: Path) -> bool:
    """Whether the run's driver is running now (on this machine: its pid exists)."""
    try:
        record = json.loads((run_dir / DRIVER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if record.get("host") != socket.gethostname():
        return True  # another machine's driver: trust the marker
    try:
        os.kill(int(record["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class ProgressWriter:
    """Throttled writer of one stage's `progress.json`."""

    def __init__(self, stage_dir: Path, every_seconds: float = 1.0):
        self.path = stage_dir / PROGRESS_FILE
        self.every = every_seconds
        self.last = 0.0

    def update(self, force: bool = False, **fields) -> None:
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {**fields, "updated": now}, indent=None)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # replaced or removed since it was listed
        return 0.0


def read_progress(stage_dir: Path) -> dict | None:
    """The stage's `progress.json`; for a stage that trains its models in subfolders and has none of
    its own (seed_models: `clip/train/`, `dfn/train/`), the newest of theirs, with `part` naming it.
    Only `<part>/train/` is looked in: a shard folder is never listed."""
    own = _read(stage_dir / PROGRESS_FILE)
    if own is not None or not stage_dir.is_dir():
        return own
    nested = sorted(stage_dir.glob(f"*/train/{PROGRESS_FILE}"), key=_modified)
    found = _read(nested[-1]) if nested else None
    if found is not None:
        found["part"] = nested[-1].parent.parent.name
    return found


def describe(stage_dir: Path) -> str:
    """One line of what a stage has done so far, from the `progress.json` it writes while running:
    tasks or steps done of total, samples and rate, and a loss where the stage trains."""
    progress = read_progress(stage_dir)
    if progress is None:
        return ""
    unit = progress.get("unit", "tasks")
    part = f"{progress['part']}: " if progress.get("part") else ""
    if unit == "steps":
        text = f"{part}step {progress['done']:,}/{progress['total']:,}"
    else:
        text = f"{part}{progress['done']:,}/{progress['total']:,} {unit}"
    if "loss" in progress:
        text += f", loss {progress['loss']:.3f}"
    if progress.get("samples"):
        text += f", {progress['samples']:,} samples, {progress.get('samples_per_second', 0):,.0f}/s"
    age = time.time() - progress.get("updated", time.time())
    return text + (f" (updated {age:.0f} s ago)" if age >= 5 else "")


@contextmanager
def step_progress(stage_dir: Path, console, desc: str, every_seconds: float = 1.0):
    """A live line on `console` for a stage that counts steps in its `progress.json` (training:
    step of total, loss, samples/s) while the block runs. Stages that fan out tasks draw their
    own bar (pipeline.executor), so only `unit: steps` is drawn here. No console: nothing."""
    if console is None:
        yield
        return
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    stop = threading.Event()
    columns = [TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}")]
    bar = Progress(*columns, TimeRemainingColumn(), console=console, transient=False)
    tasks: list = []  # the one bar's task, once the stage reported its first step

    def draw() -> None:
        progress = read_progress(stage_dir)
        if not progress or progress.get("unit") != "steps":
            return
        if not tasks:
            bar.start()
            tasks.append(bar.add_task(desc, total=progress["total"], detail=""))
        rate = progress.get("samples_per_second", 0)
        detail = f"loss {progress.get('loss', float('nan')):.3f}, {rate:,.0f} samples/s"
        bar.update(tasks[0], completed=progress["done"], detail=detail)

    def follow() -> None:
        while not stop.wait(every_seconds):
            draw()

    thread = threading.Thread(target=follow, name=f"progress-{desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        draw()  # the last step the stage wrote
        if tasks:
            bar.stop()
