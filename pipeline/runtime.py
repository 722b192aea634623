"""Start or join Ray for one pipeline run, and tell the user where the dashboard is."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RayConfig

# Variables every Ray worker needs: img2dataset imports wandb (keep it off) and albumentations
# otherwise asks PyPI for updates at import time.
WORKER_ENV = {"WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_SILENT": "true"}
# A cluster the run starts on this machine has no node an autoscaler or a spot reclaim can drain, so
# Ray Train's preemption watcher would only be one more actor process per fit, polling (~1.5 s a fit
# on 2 cores). A value the user set wins.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray Train's controller notices a run's start and end only when it polls its workers (Ray's default:
# every 2 s; the train stage sets 1 s on a cluster it joins). On this machine's own cluster, a handful
# of workers, polling every 0.2 s costs nothing and takes ~2 s off each fit. A value the user set wins.
HEALTH_CHECK = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def local_worker_env() -> dict[str, str]:
    """WORKER_ENV for a Ray this process starts on its own machine."""
    return {
        **WORKER_ENV,
        PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0"),
        HEALTH_CHECK: os.environ.get(HEALTH_CHECK, "0.2"),
    }


def export_local_worker_env() -> None:
    """Put `local_worker_env()` in this process's environment before it starts Ray: Ray's daemons and
    so every worker inherit it. Handing it to `ray.init` as the job's runtime env instead would make
    the workers Ray starts ahead of the first task unusable (theirs has no such env), so the first
    tasks would wait for new processes (~1.5 s on 2 cores) while those sit idle."""
    for key, value in local_worker_env().items():
        os.environ.setdefault(key, value)


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


def cluster_token() -> str | None:
    """Where this machine holds a Ray cluster token: `RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH`
    names, or `~/.ray/auth_token` (where `ray start` and `ray get-auth-token` put it)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return str(path) if path.is_file() and path.read_text().strip() else None


def use_token_to_join() -> str | None:
    """Before joining a cluster: send the token when there is one. Ray 2.60 heads have token auth
    on by default, but a driver joining one sends its token only with `RAY_AUTH_MODE=token`; a
    mode the user set is left alone. Returns where the token came from (None: no token here)."""
    token = cluster_token()
    if token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config

        Config.initialize("")  # Ray caches its config when imported: make it read the mode again
    return token


def _join_failure(address: str, err: Exception, token: str | None) -> RuntimeError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "InvalidAuthToken" in first:  # Ray's own sentence runs to a paragraph: say it in a few words
        first = "it refused the token from " + token if token else "it wants a token and none was sent"
    if token is None and os.environ.get("RAY_AUTH_MODE", "") != "disabled":
        return RuntimeError(
            f"cannot connect to Ray at {address} ({first}); if the cluster uses token authentication (Ray's "
            "default), put its token (`ray get-auth-token` on the head) in ~/.ray/auth_token or RAY_AUTH_TOKEN"
        )
    return RuntimeError(f"cannot connect to Ray at {address}: {first}")


def _gcs_host_port(address: str) -> tuple[str, int] | None:
    host, _, port = address.rpartition(":")
    return (host, int(port)) if host and port.isdigit() and "://" not in address else None


def check_something_listens(address: str) -> None:
    """One TCP connect before joining a GCS address: `ray.init` retries a silent address for ~20 s
    before it fails. "auto" and ray:// addresses are left to Ray."""
    target = _gcs_host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=3).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise RuntimeError(
            f"cannot connect to Ray at {address}: nothing listens there ({reason}); start the head with "
            "`ray start --head` or check the address"
        ) from None


def check_token_accepted(address: str) -> None:
    """Ask the head for its cluster id, which it answers at once (~0.6 s), or refuses at once with
    AuthenticationError when it wants a token this process does not send; `ray.init` would retry
    a refused token for ~20 s."""
    if _gcs_host_port(address) is not None:
        from ray._raylet import GcsClient

        GcsClient(address=address)


@contextmanager
def _stderr_kept_back(enabled: bool) -> Iterator[None]:
    """Hold back what is written to file descriptor 2 (Ray's C++ core writes there directly) while
    joining a cluster: a refused connection is retried for seconds, a warning line each time, and
    the one line that matters is ours. Replayed if joining succeeds, dropped if it fails."""
    if not enabled:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        sys.stderr.write(sink.read().decode(errors="replace"))  # reached only when joining worked


@contextmanager
def ray_runtime(config: RayConfig, log=print, log_to_driver: bool = True) -> Iterator[RayRuntime]:
    """Use the Ray already initialised in this process, join `config.address`, or start Ray locally.
    `log_to_driver=False` leaves what workers print in Ray's session logs."""
    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
    import ray

    if ray.is_initialized():
        context = ray.get_runtime_context()
        yield RayRuntime(address=context.gcs_address, dashboard_url=None, owned=False)
        return
    in_a_job = config.address is None and bool(os.environ.get("RAY_ADDRESS"))  # a Ray Job's driver
    address = os.environ["RAY_ADDRESS"] if in_a_job else config.address
    kwargs: dict = {"address": address, "logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if address is not None and not in_a_job:  # a job's runtime env (pipeline.jobs) already carries these
        kwargs["runtime_env"] = {"env_vars": WORKER_ENV}
    if address is None:
        export_local_worker_env()
        kwargs.update(
            num_cpus=config.num_cpus,
            include_dashboard=config.dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=config.dashboard_port,
        )
        if config.temp_dir:
            kwargs["_temp_dir"] = str(Path(config.temp_dir).absolute())
    token = use_token_to_join() if address else None
    asked = address is not None and not in_a_job  # a job's driver is handed an address its cluster answers
    if asked:
        check_something_listens(address)
    try:
        with _stderr_kept_back(enabled=address is not None):
            if asked:
                check_token_accepted(address)
            context = ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as err:
        if address is None:
            raise
        raise _join_failure(address, err, token) from None
    url = context.dashboard_url or None
    if url:
        log(dashboard_hint(url))
    try:
        yield RayRuntime(address=context.address_info.get("gcs_address", ""), dashboard_url=url, owned=True)
    finally:
        ray.shutdown()
