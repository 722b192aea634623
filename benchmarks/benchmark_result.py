"""The one result format of the benchmarks: `--json PATH` writes a list of these objects.

    {"name", "ours", "anchor", "ratio", "unit", "params", "machine"} (+ "floor" where a physical
    floor is measured, + anything a benchmark adds under "extra")

`ratio` is ours / anchor for a rate (higher is better). `machine` says what it ran on, so a
table built from the file can say so too.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path


def machine() -> dict:
    """Cores, CPU model, memory, GPU (when torch sees one), Python, and when."""
    info = {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def result(name: str, ours: float, anchor: float, unit: str, params: dict, floor: float | None = None, **extra) -> dict:
    out = {
        "name": name,
        "ours": ours,
        "anchor": anchor,
        "ratio": ours / anchor if anchor else None,
        "unit": unit,
        "params": params,
        "machine": machine(),
    }
    if floor is not None:
        out["floor"] = floor
    if extra:
        out["extra"] = extra
    return out


def write_results(path: str | None, results: list[dict]) -> None:
    """Write `results` to `path` as JSON (nothing when no path was asked for)."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {path}")
