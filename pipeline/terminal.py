"""What a person sees while a run goes: our own lines on the terminal, everything else in the run's log.

Ray's C++ core, Ray Train's controller, Ray Data, MLflow and open_clip write straight to the
process's file descriptors 1 and 2, and through Python's warnings and logging. While a quiet run
goes, both descriptors point at `runs/<run>/logs/driver.log`; the CLI's consoles (stage lines,
progress bars, the summary) write to a copy of the terminal taken before. Ray workers' output
(img2dataset in download tasks, training workers) stays in Ray's own session logs: the driver
starts Ray with `log_to_driver=False`, and `logs/ray` links to that session's folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console

DRIVER_LOG = "driver.log"


# the terminal's streams while an `output_to_log` is active: a nested one (a sweep's run inside the
# sweep's own) keeps the consoles on the terminal instead of on the outer log
_TERMINAL: dict[int, TextIO] = {}


@contextmanager
def output_to_log(log_dir: Path, consoles: Sequence[Console]) -> Iterator[Path]:
    """Send descriptors 1 and 2 to `log_dir/driver.log`; `consoles` keep writing to the terminal."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / DRIVER_LOG
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    outermost = not _TERMINAL
    if outermost:
        _TERMINAL.update({fd: os.fdopen(os.dup(saved[fd]), "w", buffering=1) for fd in (1, 2)})
    previous = [console.file for console in consoles]
    for console in consoles:
        console.file = _TERMINAL[2 if console.stderr else 1]
    with path.open("ab") as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        for console, file in zip(consoles, previous, strict=True):
            console.file = file
        if outermost:
            for file in _TERMINAL.values():
                file.close()
            _TERMINAL.clear()


def link_ray_logs(log_dir: Path) -> None:
    """`logs/ray` -> the Ray session's log folder of this driver (workers, raylet, GCS, dashboard)."""
    import ray

    try:
        session = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    except AttributeError:  # joined a remote cluster: its logs are on its head node
        return
    link = log_dir / "ray"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(session, target_is_directory=True)


def quiet_ray_data() -> None:
    """Ray Data draws its own progress bars and prints an execution summary; a quiet run shows ours."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


@contextmanager
def run_output(run_dir: Path, consoles: Sequence[Console] | None, log) -> Iterator[None]:
    """A quiet run (`consoles` given): say once where the logs go, then keep them there."""
    if consoles is None:
        yield
        return
    log(f"logs: {run_dir / 'logs'} (Ray, img2dataset, MLflow, open_clip; --verbose shows them here)")
    with output_to_log(run_dir / "logs", consoles):
        yield


def after_ray_started(run_dir: Path, quiet: bool) -> None:
    if quiet:
        link_ray_logs(run_dir / "logs")
        quiet_ray_data()
