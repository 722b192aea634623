"""The Ray executor: bounded submission, named tasks, results in item order."""

from __future__ import annotations

import io

from rich.console import Console

from pipeline.executor import make_ray_map


def _probe(item: int) -> tuple[int, float, float, str]:
    import time

    import ray

    started = time.time()
    time.sleep(1.0)
    return item, started, time.time(), ray.get_runtime_context().get_task_name()


def test_at_most_n_tasks_are_in_flight_and_each_is_named_by_stage_and_item(ray_cluster):
    # tasks ask for almost no CPU, so only the executor's bound keeps them from all running at once
    ray_map = make_ray_map(num_cpus=0.01, max_in_flight=3, console=Console(file=io.StringIO()))
    results = ray_map(_probe, list(range(9)), desc="probe")
    assert [r[0] for r in results] == list(range(9))
    spans = [(r[1], r[2]) for r in results]
    most_at_once = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert 2 <= most_at_once <= 3, spans
    assert [r[3] for r in results] == [f"probe:{i}" for i in range(9)]


def _where(value: int) -> tuple[int, int, str]:
    import os

    import ray

    return value * 2, os.getpid(), ray.get_runtime_context().get_task_name()


def test_one_task_runs_on_a_worker_under_its_name(ray_cluster):
    import os

    from pipeline.executor import run_one

    doubled, pid, name = run_one(_where, 21, name="evaluate:0", num_cpus=0.5)
    assert (doubled, name) == (42, "evaluate:0") and pid != os.getpid()  # a worker's, not the driver's
