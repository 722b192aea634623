"""CPU seconds by kind of process while a command runs: where a test suite's (or a run's) time goes.

    .venv/bin/python benchmarks/cpu_by_process.py --json cpu.json -- .venv/bin/python -m pytest -q

Every 0.5 s it reads utime + stime of every process in /proc and adds each one's growth to its
kind: Ray names its workers `ray::<Actor or task>` (kept, cut at the first `.`/`(`/`:`), Ray's
daemons and other programs are named by what their command line runs. Processes that start and
end between two samples are missed, so the total is a lower bound. Linux only; run by hand.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

DAEMONS = ("gcs_server", "raylet", "dashboard/agent.py", "runtime_env/agent", "log_monitor", "dashboard.py")
# in this order: a `-m pipeline` run a test starts names a pytest temp folder on its command line
NAMED = ("-m pipeline", "pytest", "mlflow", "postgres", "chromium")
# A Ray worker, until it takes a task or an actor and renames itself `ray::...`, runs
# default_worker.py with the raylet's socket and the GCS address among its arguments: it is named
# by what it runs, before any daemon its arguments mention.
STARTING_WORKER = "default_worker.py"


def kind_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/comm") as handle:
            comm = handle.read().strip()
    except OSError:
        return None
    return kind_of_command(command, comm)


def kind_of_command(command: str, comm: str = "") -> str:
    """A process's kind from its command line (`comm` names a process without one, e.g. a kernel thread)."""
    if command.startswith("ray::"):
        return "ray::" + re.split(r"[.(:\s]", command[5:], maxsplit=1)[0]
    words = command.split()
    script = [word for word in words[1:] if not word.startswith("-")][:1]  # past the interpreter's options
    program = " ".join(words[:1] + script)  # what runs, not the arguments it is given
    if STARTING_WORKER in program:
        return STARTING_WORKER + " (a Ray worker starting)"
    for name in DAEMONS:
        if name in program:
            return name
    for name in NAMED:
        if name in command:
            return name
    return command[:60] or f"[{comm}]"


def ticks_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def sample(seen: dict[int, int], totals: collections.Counter, first: bool) -> None:
    """Add each process's ticks since the last sample to its kind (a kind is looked up again when a
    process used CPU, because Ray renames a worker when it takes an actor or task)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        ticks = ticks_of(pid)
        if ticks is None:
            continue
        grown = ticks - seen.get(pid, 0 if not first else ticks)  # processes already running count from now
        seen[pid] = ticks
        if grown > 0:
            kind = kind_of(pid)
            if kind is not None:
                totals[kind] += grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write {kind: cpu seconds} here")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    hz = os.sysconf("SC_CLK_TCK")
    seen: dict[int, int] = {}
    totals: collections.Counter = collections.Counter()
    sample(seen, totals, first=True)
    started = time.monotonic()
    child = subprocess.Popen(command)
    while child.poll() is None:
        time.sleep(0.5)
        sample(seen, totals, first=False)
    wall = time.monotonic() - started
    seconds = {kind: ticks / hz for kind, ticks in totals.most_common()}
    total = sum(seconds.values())
    print(f"exit {child.returncode}, {wall:.0f} s wall, {total:.0f} CPU-seconds attributed on {os.cpu_count()} cores")
    for kind, value in list(seconds.items())[: args.top]:
        print(f"{value:9.1f} s  {100 * value / max(total, 1e-9):5.1f}%  {kind}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"wall_s": wall, "cores": os.cpu_count(), "cpu_s": seconds}, handle, indent=1)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
