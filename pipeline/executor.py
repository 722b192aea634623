"""Fan a stage's work items out as Ray tasks, with retries and a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.interrupts import raise_if_interrupted

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


def make_ray_map(max_retries: int = 2, num_cpus: float = 1, console: Console | None = None):
    """Build a `MapFn` that runs each item as a Ray task (retried on worker death or error)."""
    console = console or Console(stderr=True)

    def ray_map(
        fn: Callable[[T], R], items: Sequence[T], *, desc: str = "", weight: Callable[[R], int] | None = None
    ) -> list[R]:
        import ray

        if not items:
            return []
        remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=True)(fn)
        index_of = {remote.remote(item): i for i, item in enumerate(items)}
        results: list[R | None] = [None] * len(items)
        pending = list(index_of)
        samples, started = 0, time.perf_counter()
        columns = [
            TextColumn(f"[bold]{desc}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, console=console, transient=False) as progress, _cancelled_on_exit(pending):
            task = progress.add_task(desc, total=len(items), rate="")
            while pending:
                raise_if_interrupted()
                done, still = ray.wait(pending, num_returns=1, timeout=1.0)
                pending[:] = still  # in place: `_cancelled_on_exit` holds this list
                for ref in done:
                    i = index_of[ref]
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
        return results  # type: ignore[return-value]

    return ray_map
