"""A full disk mid-run: one line that says what happened and what to do, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import small_demo_overrides


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 KB tmpfs: enough for the run to start, not for the demo pool's images."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_gives_one_line_and_the_way_to_continue(tiny_disk):
    overrides = [o for o in small_demo_overrides(tiny_disk / "runs") if not o.startswith("stages=")]
    args = [a for o in [*overrides, "stages=[demo_pool, download, phash, dedupe]"] for a in ("--set", o)]
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", "demo", *args], capture_output=True, text=True)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "no space left on the device holding" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "pipeline resume" in errors[0]
    assert "MLflow at sqlite" in out.stdout  # the store could not be written either: said once, run went on
