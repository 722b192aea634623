"""Best-effort MLflow logging: the first failure turns logging off, with one warning, and work goes on.

Why: everything MLflow shows is also in the run folder (manifests, `train_log.jsonl`,
checkpoints), so a tracking server that goes away must cost a dashboard, never a training run.
`python -m pipeline sync RUN` replays the folder into MLflow once the server is back.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# An unreachable server should be noticed in seconds, not after MLflow's default of 7 retries
# with exponential backoff and 120 s timeouts. Users' own settings win.
FAST_FAIL_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def fail_fast() -> None:
    for key, value in FAST_FAIL_ENV.items():
        os.environ.setdefault(key, value)


class MlflowSink:
    """Calls into one `MlflowClient`; after a failure, every later call is skipped."""

    def __init__(self, uri: str, warn: Callable[[str], None] | None = None):
        from mlflow import MlflowClient

        fail_fast()
        seed_sqlite_store(uri)
        self.uri = uri
        self.problem: str | None = None
        self._warn = warn or logging.getLogger(__name__).warning
        self.client = self._guard(MlflowClient, uri)  # a sqlite store is created (and can fail) right here

    @property
    def online(self) -> bool:
        return self.problem is None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`client.<method>(...)`, or None when the store is (or has just become) unreachable."""
        if self.problem is not None:
            return None
        return self._guard(getattr(self.client, method), *args, **kwargs)

    def _guard(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any store failure: network, HTTP, database, disk
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            self.problem = f"{type(err).__name__}: {first}"
            self._warn(
                f"MLflow at {self.uri} failed ({self.problem}); the run goes on and its folder keeps every "
                "metric: replay it with `python -m pipeline sync RUN` when the store is back"
            )
            return None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clip-pipeline"


def seed_sqlite_store(uri: str) -> None:
    """Start a new sqlite store as a copy of an empty one made once per MLflow version.

    Why: MLflow creates a store by running its whole migration history (about 2 s of CPU per store,
    and every run folder gets one); a copy takes 0.06 s. The copy differs from MLflow's own only in
    the Default experiment's artifact location and times, which are set as MLflow would set them.
    Anything unusual (a query string, an existing file, an unwritable cache) leaves it to MLflow."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.name in ("", ":memory:") or path.exists():
        return
    scratch = path.with_name(f".{path.name}.{os.getpid()}.seed")
    try:
        template = _empty_store()
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, scratch)
        now = int(time.time() * 1000)
        with sqlite3.connect(scratch) as db:
            db.execute(
                "UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                "WHERE experiment_id = 0",
                (str(Path.cwd() / "mlruns" / "0"), now, now),
            )
        db.close()
        os.link(scratch, path)  # never over a store another process created meanwhile
    except (OSError, sqlite3.Error) as err:
        logging.getLogger(__name__).debug("no seeded MLflow store for %s (%s); MLflow creates it", uri, err)
    finally:
        scratch.unlink(missing_ok=True)


def _empty_store() -> Path:
    """The empty store for this MLflow version, created by MLflow itself on first use."""
    import mlflow

    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.exists():
        template.parent.mkdir(parents=True, exist_ok=True)
        scratch = template.with_name(f".{template.name}.{os.getpid()}.tmp")
        try:
            mlflow.MlflowClient(f"sqlite:///{scratch}").search_experiments()
            os.replace(scratch, template)
        finally:
            scratch.unlink(missing_ok=True)
    return template
