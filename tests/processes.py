"""Killing a Ray worker process by what Ray names it, while the code under test runs in a thread."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest


def pids_running(marker: str) -> list[int]:
    """Processes whose command line (Ray sets it to `ray::<Actor>...`) contains `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def run_in_thread(fn, *args):
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def kill_when(condition, marker: str, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = pids_running(marker)
        if pids and condition():
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(0.2)
    pytest.fail(f"no {marker} process to kill within {timeout}s")
