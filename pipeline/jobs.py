"""A run submitted to a remote Ray cluster as a Ray Job: it shows in the dashboard's Jobs view
with its logs, and its driver runs on the cluster, not on the submitting laptop.

`pipeline run RECIPE --address http://HEAD:8265` (the dashboard's address, as `ray job submit`
takes it) uploads the project (`pipeline/`, `stages/`, `filters/`, the recipes) as the job's
working directory and runs `python -m pipeline run RECIPE --set ...` there. The cluster token is
sent when this machine has one (see `pipeline.runtime.use_token_to_join`).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pipeline.runtime import WORKER_ENV, use_token_to_join

PROJECT = Path(__file__).resolve().parents[1]
UPLOAD_EXCLUDES = [
    *(".venv", ".git", ".ruff_cache", ".pytest_cache", "runs", "mlruns", "mlartifacts", "*.db"),
    *("**/__pycache__", "*.egg-info", "tests"),
]


def is_job_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def job_entrypoint(recipe: str, overrides: list[str]) -> str:
    """The command the job runs, quoted for a shell (Ray runs entrypoints through one)."""
    words = ["python", "-m", "pipeline", "run", recipe]
    for override in overrides:
        words += ["--set", override]
    return shlex.join(words)


def check_submittable(recipe: str, output_dir: str) -> None:
    """A job runs in a copy of the project on the cluster: its recipe must be in that copy, and
    its runs must land somewhere that outlives the job's temporary working directory."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and not path.resolve().is_relative_to(PROJECT):
        raise ValueError(f"a submitted job sees only the project folder: move {recipe} inside {PROJECT}")
    if "://" not in output_dir and not Path(output_dir).is_absolute():
        raise ValueError(
            f"a submitted run writes on the cluster: set output_dir to an absolute path or a bucket there "
            f"(--set output_dir=/data/runs), not '{output_dir}'"
        )


AGENT_WAIT_SECONDS = 60.0


def submit_when_agent_is_up(client, log, wait_seconds: float = AGENT_WAIT_SECONDS, pause: float = 1.0, **job) -> str:
    """`client.submit_job(**job)`. A head's dashboard answers seconds before its job agent is up and
    meanwhile refuses with "No available agent to submit job, please try again later": that one
    refusal is retried (saying so once) for up to `wait_seconds`; any other is raised."""
    deadline = time.monotonic() + wait_seconds
    told = False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the cluster's job agent did not come up in {wait_seconds:.0f} s; if another Ray runs on the "
                    "head's machine, it may hold the agent's port (52365): start the head with "
                    "--dashboard-agent-listen-port=<a free port>"
                ) from None
            if not told:
                log(f"the cluster's job agent is not up yet (a new head?): retrying for up to {wait_seconds:.0f} s")
                told = True
            time.sleep(pause)


def submit_run(
    address: str,
    recipe: str,
    overrides: list[str],
    output_dir: str,
    log: Callable[[str], None] = print,
    poll_seconds: float = 2.0,
) -> str:
    """Submit, then follow the job's log until it ends; the job's final status ('SUCCEEDED', ...)."""
    check_submittable(recipe, output_dir)
    use_token_to_join()
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"cannot reach the Ray dashboard at {address}: {first}") from None
    name = Path(recipe).stem
    job_id = submit_when_agent_is_up(
        client,
        log,
        entrypoint=job_entrypoint(recipe, overrides),
        submission_id=f"pipeline-{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}",
        runtime_env={"working_dir": str(PROJECT), "excludes": UPLOAD_EXCLUDES, "env_vars": WORKER_ENV},
        metadata={"recipe": name},
    )
    log(f"submitted as Ray Job {job_id} to {address} (dashboard: Jobs view); following its log")
    log(f"stop it with: ray job stop {job_id} --address {address}")
    printed = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        whole = logs if status.is_terminal() else logs[: logs.rfind("\n") + 1]  # lines still being written wait
        for line in whole[printed:].splitlines():
            log(line)
        printed = max(printed, len(whole))
        if status.is_terminal():
            return str(status)
        time.sleep(poll_seconds)
