"""Start or join Ray for one pipeline run, and tell the user where the dashboard is."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RayConfig

# Variables every Ray worker needs: img2dataset imports wandb (keep it off) and albumentations
# otherwise asks PyPI for updates at import time.
WORKER_ENV = {"WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_SILENT": "true"}


@dataclass(frozen=True)
class RayRuntime:
    address: str
    dashboard_url: str | None
    owned: bool  # True when this process started Ray and must shut it down


def dashboard_hint(url: str) -> str:
    token_note = ""
    if os.environ.get("RAY_AUTH_MODE", "token") != "disabled":
        token_path = os.environ.get("RAY_AUTH_TOKEN_PATH", str(Path.home() / ".ray" / "auth_token"))
        token_note = (
            f" (token auth is on: paste the token from {token_path} or `ray get-auth-token` when the page asks)"
        )
    return f"Ray dashboard: http://{url}{token_note}"


@contextmanager
def ray_runtime(config: RayConfig, log=print) -> Iterator[RayRuntime]:
    """Use the Ray already initialised in this process, join `config.address`, or start Ray locally."""
    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
    import ray

    if ray.is_initialized():
        context = ray.get_runtime_context()
        yield RayRuntime(address=context.gcs_address, dashboard_url=None, owned=False)
        return
    kwargs: dict = {
        "address": config.address,
        "logging_level": logging.WARNING,
        "runtime_env": {"env_vars": WORKER_ENV},
    }
    if config.address is None:
        kwargs.update(
            num_cpus=config.num_cpus,
            include_dashboard=config.dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=config.dashboard_port,
        )
        if config.temp_dir:
            kwargs["_temp_dir"] = str(Path(config.temp_dir).absolute())
    try:
        context = ray.init(**kwargs)
    except ConnectionError as err:
        raise RuntimeError(f"cannot connect to Ray at {config.address}: {err}") from err
    url = context.dashboard_url or None
    if url:
        log(dashboard_hint(url))
    try:
        yield RayRuntime(address=context.address_info.get("gcs_address", ""), dashboard_url=url, owned=True)
    finally:
        ray.shutdown()
