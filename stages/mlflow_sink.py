"""Best-effort MLflow logging: the first failure turns logging off, with one warning, and work goes on.

Why: everything MLflow shows is also in the run folder (manifests, `train_log.jsonl`,
checkpoints), so a tracking server that goes away must cost a dashboard, never a training run.
`python -m pipeline sync RUN` replays the folder into MLflow once the server is back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
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
