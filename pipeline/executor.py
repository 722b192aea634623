"""Fan a stage's work items out as Ray tasks, with retries and a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.interrupts import raise_if_interrupted
from pipeline.metrics import record_throughput
from pipeline.progress import ProgressWriter

T = TypeVar("T")
R = TypeVar("R")


class StageTaskError(RuntimeError):
    """A work item failed on every retry."""


@contextmanager
def _cancelled_on_exit(pending: list) -> Iterator[None]:
    """On Ctrl-C (or any error) force-cancel the tasks still in flight before anything else unwinds.

    Otherwise a task can finish *after* the run decided to stop, e.g. a download part completing
    with connection errors once the demo's loopback server has shut down, and a resume would then
    take that part as done.
    """
    import ray

    try:
        yield
    except BaseException:
        for ref in list(pending):
            with suppress(Exception):
                ray.cancel(ref, force=True)
        with suppress(Exception):  # cancelling is asynchronous: wait until the workers are gone
            ray.wait(list(pending), num_returns=len(pending), timeout=10)
        raise


def run_one(fn: Callable[..., R], *args, name: str, num_cpus: float = 1, num_gpus: float = 0) -> R:
    """`fn(*args)` as one Ray task with these resources (in-process when Ray is not running), named
    `name` in the dashboard; Ctrl-C cancels it, as for a stage's fanned-out tasks."""
    import ray

    if not ray.is_initialized():
        return fn(*args)
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(fn)
    pending = [task.options(name=name).remote(*args)]
    ref = pending[0]
    with _cancelled_on_exit(pending):
        while not ray.wait([ref], timeout=1.0, fetch_local=False)[0]:
            raise_if_interrupted()
        raise_if_interrupted()
        return ray.get(ref)


def default_in_flight(num_cpus: float) -> int:
    """Two tasks per CPU slot the cluster has for them: one running, the next already queued, so a
    slot never idles while the driver reacts, and the driver tracks a few refs, not a million."""
    import ray

    slots = ray.cluster_resources().get("CPU", 1.0) / max(num_cpus, 1e-6)
    return max(2, int(2 * slots))


def make_ray_map(
    max_retries: int = 2,
    num_cpus: float = 1,
    console: Console | None = None,
    max_in_flight: int | None = None,
    progress_dir: Path | None = None,
):
    """Build a `MapFn` that runs each item as a Ray task (retried on worker death or error).

    At most `max_in_flight` tasks exist at once (default: `default_in_flight`); the next item is
    submitted as one finishes. The driver so holds a bounded list of pending refs however many
    items there are (DataComp xlarge has 1.28M download shards), and each `ray.wait` looks at that
    bounded list only. Tasks are named `<desc>:<item index>` in the Ray dashboard. With a
    `progress_dir`, `<progress_dir>/<desc>/progress.json` says how far it is (`pipeline status`)."""
    console = console or Console(stderr=True)

    def ray_map(
        fn: Callable[[T], R], items: Sequence[T], *, desc: str = "", weight: Callable[[R], int] | None = None
    ) -> list[R]:
        import ray

        if not items:
            return []
        remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=True)(fn)
        limit = max_in_flight or default_in_flight(num_cpus)
        results: list[R | None] = [None] * len(items)
        index_of: dict = {}
        pending: list = []
        submitted = 0

        def submit_more() -> None:
            nonlocal submitted
            while submitted < len(items) and len(pending) < limit:
                ref = remote.options(name=f"{desc or fn.__name__}:{submitted}").remote(items[submitted])
                index_of[ref] = submitted
                pending.append(ref)
                submitted += 1

        samples, started = 0, time.perf_counter()
        writer = ProgressWriter(progress_dir / desc) if progress_dir is not None and desc else None

        def report(done: int, force: bool = False) -> None:
            rate = samples / max(time.perf_counter() - started, 1e-9)
            if desc and done:
                record_throughput(desc, rate)
            if writer is not None:
                writer.update(
                    force, unit="tasks", done=done, total=len(items), samples=samples, samples_per_second=rate
                )

        columns = [
            TextColumn(f"[bold]{desc}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, console=console, transient=False) as progress, _cancelled_on_exit(pending):
            task = progress.add_task(desc, total=len(items), rate="")
            report(0, force=True)
            submit_more()
            while pending:
                raise_if_interrupted()
                done, still = ray.wait(pending, num_returns=1, timeout=1.0, fetch_local=False)
                pending[:] = still  # in place: `_cancelled_on_exit` holds this list
                for ref in done:
                    i = index_of.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        for other in pending:
                            ray.cancel(other)
                        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                        raise StageTaskError(f"{desc}: item {i} failed after {max_retries} retries: {cause}") from None
                    if weight is not None:
                        samples += weight(results[i])
                    elapsed = time.perf_counter() - started
                    rate = f"{samples} samples, {samples / elapsed:.0f}/s" if weight else ""
                    progress.update(task, advance=1, rate=rate)
                    report(submitted - len(pending))
                submit_more()
            report(len(items), force=True)
        return results  # type: ignore[return-value]

    return ray_map
